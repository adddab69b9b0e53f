"""Lightning strategies: FSDP2 sharding with tensor parallel and loss parallel."""

from lit_tune.strategies.fsdp2 import FSDP2Strategy

__all__ = ["FSDP2Strategy"]
