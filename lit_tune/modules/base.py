"""``CausalLMModule``: what every lit_tune training module shares.

It builds the causal LM in ``configure_model`` (so a sharding strategy can build it on the meta
device), creates the optimizer and schedule from injectable callables (LightningCLI's
``OptimizerCallable``/``LRSchedulerCallable``), checks batches against the vocabulary, stops on
non-finite losses, logs throughput and exports a Hugging Face folder at the end of ``fit``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import AdamW
from transformers import PreTrainedModel
from typing_extensions import override

from lit_tune.data.collate import TokenBatch
from lit_tune.models.export import export_hf
from lit_tune.models.loading import load_model, load_tokenizer, resolve_source
from lit_tune.optim import WarmupCosine

log = logging.getLogger(__name__)

_PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class CausalLMModule(L.LightningModule):
    """Base class of lit_tune's modules; subclasses implement ``training_step``.

    Args:
        model: Model source: ``"tiny"``, a local Hugging Face folder or ``.gguf`` file, or a hub name.
        tokenizer: Tokenizer source; defaults to ``model``.
        optimizer: Callable that builds the optimizer from parameters (default AdamW, lr 1e-3).
        lr_scheduler: Callable that builds the schedule from the optimizer (default
            :class:`~lit_tune.optim.WarmupCosine` without warm-up; its length is set from
            ``trainer.estimated_stepping_batches``).
        attn_implementation: transformers attention kernel, e.g. ``"sdpa"`` or ``"eager"``.
        allow_pickle: Allow ``pytorch_model.bin`` weights from a local folder.
        trust_remote_code: Allow modelling and tokenizer code from the source to run.
        export_dir: Where ``fit`` writes the Hugging Face export: a path, or None for
            ``<log_dir>/hf_model``. Set ``export=False`` to skip it.
        export: Export a Hugging Face folder when ``fit`` ends.
        skip_nonfinite: Skip optimizer steps whose loss is NaN or infinite (counted and logged)
            instead of stopping with an error.
    """

    def __init__(
        self,
        model: str = "tiny",
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable = WarmupCosine,
        attn_implementation: str = "sdpa",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        export_dir: str | None = None,
        export: bool = True,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # Record the resolved tokenizer so that Lightning's check that module and data module
        # hparams agree compares it with the data module's `tokenizer`.
        self.hparams["tokenizer"] = tokenizer or model
        self._hparams_initial = copy.deepcopy(self._hparams)
        resolve_source(model)  # fail at construction on a path that does not exist
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
        self.model: PreTrainedModel | None = None
        # Set when the model was built on the meta device; a sharding strategy loads it per rank.
        self.checkpoint_to_load: str | None = None
        self.nonfinite_steps = 0
        self._step_start: float | None = None

    # ----------------------------------------------------------------- model

    def build_model(self) -> PreTrainedModel:
        """Build the causal LM. Override to change architecture or initialisation.

        Under a meta-device context (a sharding strategy's ``empty_init``), only the architecture
        is built and ``checkpoint_to_load`` names the folder the strategy loads weights from.
        """
        hp = self.hparams
        on_meta = torch.empty(0).device.type == "meta"
        source = resolve_source(hp.model)
        if on_meta and source.kind == "folder":
            self.checkpoint_to_load = source.location
        return load_model(
            hp.model,
            vocab_size=len(self.tokenizer),
            allow_pickle=hp.allow_pickle,
            trust_remote_code=hp.trust_remote_code,
            attn_implementation=hp.attn_implementation,
            weights=not on_meta,
        )

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_model()
        self._check_vocab()

    def _check_vocab(self) -> None:
        rows = self.model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model's embedding has only "
                f"{rows} rows, so some token ids have no embedding. Use the tokenizer that belongs to "
                "the model, or resize the embedding (model.resize_token_embeddings) in build_model."
            )

    @override
    def on_fit_start(self) -> None:
        # Check the data once, up front, rather than every batch on the device.
        rows = getattr(self.trainer.datamodule, "train_rows", None)
        if not rows or self.model is None:
            return
        vocab = self.model.get_input_embeddings().weight.shape[0]
        largest = max(max(row.input_ids) for row in rows)
        if largest >= vocab:
            raise ValueError(
                f"The training data contains token id {largest}, outside the model's vocabulary of "
                f"{vocab}. Tokenize the data with the model's own tokenizer."
            )

    def forward_logits(self, batch: TokenBatch) -> Tensor:
        """Run the model on a batch and return logits ``[batch, seq_len, vocab]``."""
        if batch.position_ids is not None and self.hparams.attn_implementation not in _PACKING_ATTENTION:
            raise ValueError(
                f"attn_implementation={self.hparams.attn_implementation!r} cannot keep packed documents "
                f"apart; use one of {list(_PACKING_ATTENTION)} or turn packing off."
            )
        output = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return output.logits

    # ------------------------------------------------------------ optimizers

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        # Frozen parameters (a live reference model, for example) are left out of the optimizer.
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------- guards

    def check_finite(self, loss: Tensor, batch_idx: int) -> Tensor | None:
        """Return ``loss``, or None to skip the step when it is not finite and skipping is on.

        Raises:
            FloatingPointError: On a non-finite loss when ``skip_nonfinite`` is False.
        """
        # NOTE: one host synchronisation per step; cheap next to a training step.
        if torch.isfinite(loss.detach()).item():
            return loss
        where = f"step {self.global_step}, batch {batch_idx}"
        if not self.hparams.skip_nonfinite:
            raise FloatingPointError(
                f"Loss is {loss.item()} at {where}. Lower the learning rate, check the data, or set "
                "skip_nonfinite=True to skip such steps."
            )
        self.nonfinite_steps += 1
        log.warning("Skipping non-finite loss at %s (%d skipped so far).", where, self.nonfinite_steps)
        self.log("train/skipped_steps", float(self.nonfinite_steps))
        return None

    # ------------------------------------------------------------ logging

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def log_throughput(self, num_tokens: int) -> None:
        """Log ``train/tokens_per_sec`` for this rank, from the time since the batch started."""
        if self._step_start is None:
            return
        elapsed = time.perf_counter() - self._step_start
        if elapsed > 0:
            self.log("train/tokens_per_sec", num_tokens / elapsed, on_step=True, on_epoch=False)

    # ------------------------------------------------------------ resume

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not save random-number state; sampling and dropout need it to resume
        # exactly. Stored as tensors and lists so that `weights_only=True` loading accepts it.
        checkpoint["lit_tune_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_tune_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate((3, tuple(state["python"]), None))

    # -------------------------------------------------------------- export

    def export_path(self) -> Path:
        """Folder the Hugging Face export is written to."""
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "hf_model"

    @override
    def on_fit_end(self) -> None:
        if self.nonfinite_steps:
            rank_zero_info(f"Skipped {self.nonfinite_steps} steps with a non-finite loss.")
        if self.hparams.export and self.model is not None:
            export_hf(self.model, self.tokenizer, self.export_path())


def perplexity(mean_loss: Tensor) -> Tensor:
    """Perplexity from a mean token cross entropy, capped to stay finite."""
    return torch.exp(mean_loss.clamp(max=math.log(1e30)))


__all__ = ["CausalLMModule", "perplexity"]
