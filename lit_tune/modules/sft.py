"""``SFTModule``: supervised fine-tuning of a causal LM on response tokens."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lit_tune.data.collate import TokenBatch
from lit_tune.data.sft import data_parallel_info
from lit_tune.generation import greedy_generate, split_prompts
from lit_tune.losses import cross_entropy_sum, linear_cross_entropy_sum, shift_labels
from lit_tune.modules.base import CausalLMModule, perplexity

log = logging.getLogger(__name__)


class SFTModule(CausalLMModule):
    """Supervised fine-tuning: cross entropy on response tokens, normalised per optimizer step.

    Each optimizer step weighs every trained token equally, whatever the micro-batch sizes,
    ``accumulate_grad_batches`` or number of data-parallel ranks (see :meth:`normalise`). Logs
    ``train/loss``, ``val/loss``, ``val/perplexity``, ``train/tokens_per_sec`` and the learning rate
    (with ``LearningRateMonitor``).

    Args:
        label_smoothing: Label smoothing of the cross entropy (also exact under loss parallel).
        linear_cross_entropy: Compute the output head and the training loss together, a chunk of
            tokens at a time (:func:`~lit_tune.losses.linear_cross_entropy_sum`), so the
            ``[batch, seq_len, vocab]`` logits never exist whole: same loss and gradients and less
            memory. It applies only where it cannot change the result: ``compute_loss`` not
            overridden, a bias-free linear head that is not sharded, and a model type whose head
            applies nothing after the projection (``_LINEAR_LOSS_MODEL_TYPES``). Elsewhere the
            logits path runs; which path runs is logged at the first training step.
        max_new_tokens: Longest completion ``predict`` generates.
        **kwargs: Model, tokenizer, optimizer and export options of
            :class:`~lit_tune.modules.base.CausalLMModule`.

    Example::

        module = SFTModule(model="tiny")
        trainer = L.Trainer(max_steps=100)
        trainer.fit(module, datamodule=SFTDataModule(path="train.jsonl"))
    """

    def __init__(self, *args, label_smoothing: float = 0.0, linear_cross_entropy: bool = True, max_new_tokens: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens
        self.hparams["max_new_tokens"] = max_new_tokens
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
        self.label_smoothing = label_smoothing
        self.hparams["label_smoothing"] = label_smoothing
        self.hparams["linear_cross_entropy"] = linear_cross_entropy
        self._linear_loss: bool | None = None  # decided at the first training step
        self.val_loss = MeanMetric()
        self.empty_batches = 0

    def compute_loss(self, logits: Tensor, targets: Tensor, batch: TokenBatch) -> Tensor:
        """Return the *summed* loss over trained tokens; override to change the objective.

        The caller divides by the number of trained tokens of the whole optimizer step, so an
        override must return a sum over tokens too (for example add ``z_weight * (lse**2)`` summed
        over the positions where ``targets != -100``).

        Args:
            logits: ``[batch, seq_len, vocab]``, possibly a vocabulary-sharded DTensor.
            targets: ``[batch, seq_len]`` shifted labels, -100 where no loss is taken.
            batch: The batch, for anything else an override needs.
        """
        return cross_entropy_sum(logits, targets, label_smoothing=self.label_smoothing)

    def normalise(self, loss_sum: Tensor, batch: TokenBatch) -> Tensor:
        """Scale a micro-batch's summed loss so that the optimizer step averages over its tokens.

        Lightning divides each micro-batch loss by ``k = accumulate_grad_batches``, and data
        parallelism averages gradients over ``R`` ranks. With ``N`` trained tokens in the whole step
        (``batch.window_targets``), returning ``loss_sum * R * k / N`` makes the step's gradient
        ``sum(all token losses) / N``: every token weighs ``1/N``. Batches from other loaders carry
        no step count and fall back to the micro-batch mean.
        """
        if batch.window_targets > 0:
            replicas, _ = data_parallel_info(self.trainer)
            scale = replicas * self.trainer.accumulate_grad_batches / batch.window_targets
        else:
            scale = 1.0 / max(batch.num_targets, 1)
        return loss_sum * scale

    def _uses_linear_loss(self) -> bool:
        """Whether the training loss skips the full logits (see ``linear_cross_entropy``)."""
        if self._linear_loss is None:
            self._linear_loss = bool(self.hparams.linear_cross_entropy) and _linear_loss_applies(self)
            rank_zero_info(
                "SFT loss: output head and cross entropy computed together in chunks."
                if self._linear_loss
                else "SFT loss: cross entropy on the full logits."
            )
        return self._linear_loss

    @override
    def training_step(self, batch: TokenBatch, batch_idx: int) -> Tensor | None:
        targets = shift_labels(batch.labels)
        if self._uses_linear_loss():
            hidden = self.forward_hidden(batch)
            head = self.model.get_output_embeddings().weight
            loss_sum = linear_cross_entropy_sum(hidden, head, targets, label_smoothing=self.label_smoothing)
        else:
            loss_sum = self.compute_loss(self.forward_logits(batch), targets, batch)
        loss = self.check_finite(self.normalise(loss_sum, batch), batch_idx)
        if loss is None:
            return None

        # Log the micro-batch's mean token loss; the normalised loss depends on the step's size.
        if batch.num_targets > 0:
            self.log("train/loss", loss_sum.detach() / batch.num_targets, prog_bar=True, batch_size=len(batch))
        else:
            self.empty_batches += 1
            log.info("Batch %d has no trained token; it adds zero loss (%d so far).", batch_idx, self.empty_batches)
        self.log_throughput(batch.num_tokens)
        return loss

    @override
    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        logits = self.forward_logits(batch)
        loss_sum = cross_entropy_sum(logits, shift_labels(batch.labels))
        if batch.num_targets > 0:
            self.val_loss.update(loss_sum / batch.num_targets, weight=batch.num_targets)

    @override
    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0 and not self.trainer.world_size > 1:
            return
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/perplexity", perplexity(loss), sync_dist=False)

    @override
    def test_step(self, batch: TokenBatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    @override
    def predict_step(self, batch: TokenBatch, batch_idx: int) -> list[dict[str, str]]:
        """Generate greedily from each row's prompt; return prompt, completion and reference text."""
        rows = split_prompts(batch)
        completions = greedy_generate(self.model, self.tokenizer, [p for p, _ in rows], self.max_new_tokens)
        decode = self.tokenizer.decode
        return [
            {"prompt": decode(p), "completion": decode(c, skip_special_tokens=True), "reference": decode(r, skip_special_tokens=True)}
            for (p, r), c in zip(rows, completions)
        ]

    @override
    def on_train_end(self) -> None:
        if self.empty_batches:
            rank_zero_info(f"{self.empty_batches} training batches had no trained token and added zero loss.")


# Model types whose causal-LM head is exactly `lm_head(hidden)`: no logit scaling or soft-capping.
_LINEAR_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _linear_loss_applies(module: SFTModule) -> bool:
    model = module.model
    head = model.get_output_embeddings() if model is not None else None
    return (
        type(module).compute_loss is SFTModule.compute_loss
        and isinstance(head, nn.Linear)
        and head.bias is None
        and getattr(model.config, "model_type", None) in _LINEAR_LOSS_MODEL_TYPES
        and not any(isinstance(p, DTensor) for p in model.parameters())
    )


__all__ = ["SFTModule"]
