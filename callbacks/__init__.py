"""Lightning callbacks that work in any Lightning project: optimizer steps inside backward and
activation checkpointing."""

from lit_tune.callbacks.activation_checkpointing import ActivationCheckpointing
from lit_tune.callbacks.optimizer_in_backward import OptimizerInBackward

__all__ = ["ActivationCheckpointing", "OptimizerInBackward"]
