"""LightningModules, one per training method."""

from lit_tune.modules.base import CausalLMModule
from lit_tune.modules.dpo import DPOModule
from lit_tune.modules.grpo import GRPOModule
from lit_tune.modules.sft import SFTModule

__all__ = [
    "CausalLMModule",
    "DPOModule",
    "GRPOModule",
    "SFTModule",
]
