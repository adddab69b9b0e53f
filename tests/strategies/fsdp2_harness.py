"""Models, data and single-process references shared by the FSDP2Strategy tests.

``HFLossModule`` is a plain LightningModule that uses nothing of lit_tune: it wraps a
transformers causal LM and takes the model's own loss. ``LitLossModule`` computes the loss with
``lit_tune.losses`` and follows lit_tune's meta-device convention (``checkpoint_to_load``).
Both build their model in ``configure_model`` from a fixed seed, so every rank and the reference
start from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler
from transformers import LlamaConfig, LlamaForCausalLM

from lit_tune.data.sft import SFTDataModule
from lit_tune.losses import count_targets, cross_entropy_sum, shift_labels
from lit_tune.models.tiny import build_tiny_tokenizer, tiny_llama_config
from lit_tune.modules.sft import SFTModule

SEED = 1234
NUM_SEQUENCES = 8
SEQ_LEN = 8
PROMPT_LEN = 3  # tokens masked with -100 at the start of every row when masking="prompt"


def tiny_config(tied: bool = False) -> LlamaConfig:
    """Return a Llama config small enough for many 2-process runs per test session.

    With ``tied``, the output head is tied to the input embedding, the vocabulary is 16 and the
    hidden size 4. Otherwise the vocabulary is 64 and the hidden size 16.
    """
    size = {"vocab_size": 16, "hidden_size": 4} if tied else {"vocab_size": 64, "hidden_size": 16}
    return LlamaConfig(
        **size,
        intermediate_size=8 if tied else 32,
        num_hidden_layers=2,
        num_attention_heads=2 if tied else 4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    """Build the causal LM from ``config`` with the shared seed."""
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def make_samples(vocab_size: int, masking: str = "none") -> list[dict[str, Tensor]]:
    """Return ``NUM_SEQUENCES`` rows of ``input_ids`` and ``labels``.

    Args:
        vocab_size: Token ids are drawn from ``[0, vocab_size)``.
        masking: ``"none"``, ``"prompt"`` (the first ``PROMPT_LEN`` labels are -100) or ``"all"``.
    """
    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, vocab_size, (NUM_SEQUENCES, SEQ_LEN), generator=generator)
    labels = ids.clone()
    if masking == "prompt":
        labels[:, :PROMPT_LEN] = -100
    elif masking == "all":
        labels[:] = -100
    return [{"input_ids": i, "labels": label} for i, label in zip(ids, labels)]


def hf_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Return transformers' own causal-LM loss: the mean over labelled tokens."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def lit_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Return lit_tune's loss: summed token cross entropy over the labelled-token count.

    A batch without labelled tokens gives exactly 0.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    targets = shift_labels(batch["labels"])
    total = cross_entropy_sum(logits, targets, label_smoothing=label_smoothing)
    return total / count_targets(targets).clamp(min=1)


class _RecordingModule(L.LightningModule):
    """Build the model in ``configure_model`` and record losses, gradients and tie checks."""

    loss_fn: Callable[..., Tensor]

    def __init__(
        self,
        tied: bool = False,
        masking: str = "none",
        batch_size: int = 4,
        optimizer: str = "sgd",
        lr: float = 0.1,
        label_smoothing: float = 0.0,
        capture_grads: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = tiny_config(tied)
        self.model: LlamaForCausalLM | None = None
        self.losses: list[float] = []
        self.first_grads: dict[str, Tensor] | None = None
        self.logits_info: dict[str, Any] = {}
        self.tie_checks: list[bool] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model(self.config)

    def train_dataloader(self) -> DataLoader:
        # Lightning's own distributed sampler always shuffles training data. This one keeps the
        # order: rank r of R data-parallel ranks gets rows r, r + R, and so on.
        samples = make_samples(self.config.vocab_size, self.hparams.masking)
        sampler = DistributedSampler(samples, shuffle=False, **self.trainer.distributed_sampler_kwargs)
        return DataLoader(samples, batch_size=self.hparams.batch_size, sampler=sampler)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.hparams.tied:
            self.tie_checks.append(self.model.lm_head.weight is self.model.model.embed_tokens.weight)
        loss = type(self).loss_fn(self.model, batch, self.hparams.label_smoothing)
        self.losses.append(_plain(loss).item())
        return loss

    def on_after_backward(self) -> None:
        if self.hparams.capture_grads and self.first_grads is None:
            self.first_grads = {
                name: _plain(p.grad).clone() for name, p in self.named_parameters() if p.grad is not None
            }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class HFLossModule(_RecordingModule):
    """A plain LightningModule around a transformers causal LM, using the model's own loss."""

    loss_fn = staticmethod(hf_loss)


class LitLossModule(_RecordingModule):
    """A module using ``lit_tune.losses`` and lit_tune's meta-device loading convention.

    Args:
        checkpoint: Local Hugging Face folder to load when the model is built on the meta device.
        **kwargs: See ``_RecordingModule``.
    """

    loss_fn = staticmethod(lit_loss)

    def __init__(self, checkpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_to_load: str | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if torch.empty(0).device.type == "meta":
            self.model = LlamaForCausalLM(self.config)
            self.checkpoint_to_load = self.hparams.checkpoint
        else:
            self.model = build_model(self.config)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"]).logits
        self.logits_info["sharded"] = isinstance(logits, DTensor)
        self.logits_info["logits"] = _plain(logits).detach().clone()

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def _plain(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def reference_run(
    loss_fn: Callable[..., Tensor],
    *,
    tied: bool = False,
    masking: str = "none",
    steps: int,
    optimizer: str = "sgd",
    lr: float = 0.1,
    label_smoothing: float = 0.0,
    global_batch: int = 4,
) -> dict[str, Any]:
    """Train one unsharded model in this process on the same global batches.

    Returns:
        ``losses`` per step, ``first_grads`` (named as in the LightningModule, with a
        ``model.`` prefix) and the final ``state_dict``.
    """
    config = tiny_config(tied)
    model = build_model(config)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    samples = make_samples(config.vocab_size, masking)
    batches = list(DataLoader(samples, batch_size=global_batch))
    losses, first_grads = [], None
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)], label_smoothing)
        opt.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "first_grads": first_grads, "state_dict": state, "model": model}


def save_sft_model(folder: Path) -> None:
    """Write the ``tiny`` preset (tokenizer and seeded weights) as a Hugging Face folder."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    build_model(tiny_llama_config(len(tokenizer))).save_pretrained(folder)


def sft_module(folder: Path, export_dir: Path) -> SFTModule:
    """Return lit_tune's SFTModule on the model in ``folder``, exporting to ``export_dir``."""
    return SFTModule(model=str(folder), optimizer=partial(torch.optim.SGD, lr=0.1), export_dir=str(export_dir))


def sft_data(folder: Path) -> SFTDataModule:
    """Return 8 prompt/response rows, 4 per micro-batch, without a validation split."""
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}"} for i in range(8)]
    return SFTDataModule(rows=rows, tokenizer=str(folder), val_fraction=0.0, batch_size=4, max_seq_len=64)


class LossRecorder(L.Callback):
    """Record the loss that each training step returned."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
