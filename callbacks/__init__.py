"""Lightning callbacks that work in any Lightning project: optimizer steps inside backward,
activation checkpointing, and a checkpoint on SIGTERM."""

from lit_tune.callbacks.activation_checkpointing import ActivationCheckpointing
from lit_tune.callbacks.optimizer_in_backward import OptimizerInBackward
from lit_tune.callbacks.preemption import PreemptionCheckpoint

__all__ = ["ActivationCheckpointing", "OptimizerInBackward", "PreemptionCheckpoint"]
