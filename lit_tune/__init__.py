"""lit_tune: post-training for causal language models on Lightning."""

from lit_tune.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_tune.modules import CausalLMModule, DPOModule, GRPOModule, SFTModule

__version__ = "0.1.0"

__all__ = [
    "CausalLMModule",
    "DPOModule",
    "GRPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "SFTModule",
    "__version__",
]
