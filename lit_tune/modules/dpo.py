"""``DPOModule``: preference optimisation (DPO and its variants) of a causal LM."""

from __future__ import annotations

import copy
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lit_tune.data.preference import PreferenceBatch, PreferenceRow, collate_pairs
from lit_tune.data.sft import data_parallel_info
from lit_tune.losses import IGNORE_INDEX, shift_labels, token_log_probs
from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput
from lit_tune.losses.preference_registry import build_preference_loss
from lit_tune.modules.base import CausalLMModule

log = logging.getLogger(__name__)

ReferenceMode = Literal["live", "precomputed", "none"]
_REFERENCE_MODES = ("live", "precomputed", "none")
# Checkpoint key of the precomputed reference log-probabilities, ``{"train": [N, 2], "val": [M, 2]}``.
REFERENCE_CHECKPOINT_KEY = "dpo_reference_logps"
# Metrics logged for every loss, under ``train/`` and ``val/``. Losses may add more (``extra_metrics``).
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class DPOModule(CausalLMModule):
    """Preference optimisation on chosen/rejected pairs: DPO, IPO, hinge, cDPO, SimPO or ORPO.

    Each training step runs the chosen and rejected sequences of its pairs through the policy in
    one forward pass, sums the log-probabilities of the response tokens, and applies the loss
    chosen by name (see :mod:`lit_tune.losses.preference_registry`). The loss is a mean over the
    pairs of the whole optimizer step, whatever the accumulation or number of data-parallel ranks.

    The reference log-probabilities come from one of:

    - ``"precomputed"`` (default for losses that need a reference): at the start of ``fit`` the
      policy, still equal to the reference, scores every training and validation pair once. This
      runs under the training strategy, split over data-parallel ranks. The values are stored on
      the rows and in checkpoints, and no reference model is kept during training.
    - ``"live"``: a frozen copy of the policy scores each batch. Checkpoints include it.
    - ``"none"``: no reference, for the reference-free losses (``"simpo"``, ``"orpo"``).

    Logs, under ``train/`` and ``val/``: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies`` (share of pairs whose chosen reward is strictly higher),
    ``rewards/margins``, ``logps/chosen`` and ``logps/rejected`` (summed over response tokens),
    plus any loss-specific values (ORPO: ``nll_loss``, ``log_odds_ratio``).

    Args:
        loss: Name of the loss (``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"cdpo"``, ``"simpo"``,
            ``"orpo"``) or a :class:`~lit_tune.losses.preference.PreferenceLoss` object.
        beta: The loss's ``beta``; None keeps the loss's default (0.1, or 2.0 for SimPO). Must be
            None when ``loss`` is an object.
        loss_options: Other constructor arguments of the named loss, e.g.
            ``{"label_smoothing": 0.2}`` for ``"cdpo"`` or ``{"gamma": 0.5}`` for ``"simpo"``.
        reference: ``"precomputed"``, ``"live"`` or ``"none"``; None picks ``"precomputed"`` for
            losses that need a reference and ``"none"`` for the others.
        reference_batch_size: Pairs per forward pass when precomputing reference log-probabilities.
        **kwargs: Model, tokenizer, optimizer and export options of
            :class:`~lit_tune.modules.base.CausalLMModule`.

    Raises:
        ValueError: On an unknown loss or reference mode, or a reference mode that does not fit
            the loss.

    Example::

        module = DPOModule(model="path/to/sft_model", loss="sigmoid", beta=0.1)
        trainer = L.Trainer(max_steps=100)
        trainer.fit(module, datamodule=PreferenceDataModule(path="pairs.jsonl"))
    """

    def __init__(
        self,
        *args: Any,
        loss: str | PreferenceLoss = "sigmoid",
        beta: float | None = None,
        loss_options: dict[str, Any] | None = None,
        reference: ReferenceMode | None = None,
        reference_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = _resolve_loss(loss, beta, loss_options)
        self.reference = _resolve_reference(reference, self.loss_fn)
        if reference_batch_size < 1:
            raise ValueError(f"reference_batch_size={reference_batch_size} must be at least 1.")
        self.reference_batch_size = reference_batch_size
        self.hparams["reference"] = self.reference
        self.reference_model: nn.Module | None = None
        self.eval_metrics = nn.ModuleDict(
            {_metric_key(name): MeanMetric() for name in self._metric_names()}
        )
        self._eval_prefix = "val"
        # Reference log-probabilities read from a checkpoint, applied to the rows once they exist.
        self._loaded_reference: dict[str, Tensor] | None = None
        self._reference_scored = False

    # ----------------------------------------------------------------- model

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.reference == "live":
            self.reference_model = self._build_reference_model()

    def _build_reference_model(self) -> nn.Module:
        """Return a frozen copy of the freshly built policy."""
        if any(p.is_meta for p in self.model.parameters()):
            raise ValueError(
                "reference='live' copies the policy when it is built, but the policy was built on "
                "the meta device and gets its weights only after sharding (from "
                f"{self.checkpoint_to_load!r}, or a fresh initialisation), so the copy would not "
                "match it. Use reference='precomputed', or turn meta-device init off."
            )
        # NOTE: FSDP2Strategy shards this copy's decoder layers over data-parallel ranks, but its
        # tensor-parallel plan covers only the first transformers model (the policy), so with
        # tensor_parallel_size > 1 every tensor-parallel rank keeps its own copy of the reference.
        reference = copy.deepcopy(self.model)
        reference.requires_grad_(False)
        return reference.eval()

    # ------------------------------------------------------------ log-probs

    def sequence_logps(
        self, batch: PreferenceBatch, model: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """Score every sequence of a batch: summed response log-probabilities and token counts.

        Args:
            batch: ``2B`` sequences, chosen ones first.
            model: The model to run; None for the policy (through :meth:`forward_logits`).

        Returns:
            ``(logps, tokens)``, each ``[2B]``: the log-probability of each response summed over
            its tokens, and the number of those tokens. Filler pairs give 0 for both.
        """
        if model is None:
            logits = self.forward_logits(batch)  # [2B, seq_len, vocab], maybe vocabulary-sharded
        else:
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits
        targets = shift_labels(batch.labels)
        with _loss_parallel_for(logits):
            token_logps = token_log_probs(logits, targets)  # [2B, seq_len], 0 where no target
        return token_logps.sum(dim=-1), (targets != IGNORE_INDEX).sum(dim=-1)

    @override
    def forward(self, batch: PreferenceBatch) -> Tensor:
        """Return the policy's summed response log-probability of every sequence, ``[2B]``.

        Calling the module (``module(batch)``) rather than :meth:`sequence_logps` outside a
        training step lets a sharding strategy's forward hooks gather the parameters of the root
        module, as FSDP2 needs.
        """
        return self.sequence_logps(batch)[0]

    def pair_logps(self, batch: PreferenceBatch) -> tuple[PairLogps, Tensor]:
        """Score the real pairs of a batch under the policy, and under the reference when used.

        Args:
            batch: A batch of ``B`` pairs.

        Returns:
            The log-probabilities of the real pairs, and the ``[2B]`` summed log-probabilities of
            every sequence (fillers included), which keeps every parameter in the graph.
        """
        sums, tokens = self.sequence_logps(batch)
        pairs, real = batch.batch_pairs, batch.pair_mask
        reference_chosen, reference_rejected = self._reference_logps(batch)
        logps = PairLogps(
            chosen=sums[:pairs][real],
            rejected=sums[pairs:][real],
            chosen_tokens=tokens[:pairs][real].float(),
            rejected_tokens=tokens[pairs:][real].float(),
            reference_chosen=None if reference_chosen is None else reference_chosen[real],
            reference_rejected=None if reference_rejected is None else reference_rejected[real],
        )
        return logps, sums

    def _reference_logps(self, batch: PreferenceBatch) -> tuple[Tensor | None, Tensor | None]:
        if self.reference == "none":
            return None, None
        if self.reference == "live":
            with torch.no_grad():
                sums, _ = self.sequence_logps(batch, model=self.reference_model)
            return sums[: batch.batch_pairs], sums[batch.batch_pairs :]
        if batch.reference_chosen is None or batch.reference_rejected is None:
            raise ValueError(
                "reference='precomputed', but this batch carries no reference log-probabilities. "
                "DPOModule computes them at the start of fit, validate and test for the rows of a "
                "PreferenceDataModule; pass the data as datamodule=..., or set reference='live'."
            )
        return batch.reference_chosen, batch.reference_rejected

    def compute_loss(self, logps: PairLogps) -> PreferenceLossOutput:
        """Return per-pair losses and rewards; override to change the objective.

        Args:
            logps: Log-probabilities of the real pairs of a micro-batch.
        """
        return self.loss_fn(logps)

    # -------------------------------------------------------------- training

    def normalise(self, loss_sum: Tensor, batch: PreferenceBatch) -> Tensor:
        """Scale a micro-batch's summed pair loss so that the optimizer step averages over pairs.

        Lightning divides each micro-batch loss by ``k = accumulate_grad_batches`` and data
        parallelism averages gradients over ``R`` ranks. With ``N`` real pairs in the whole step
        (``batch.window_pairs``), returning ``loss_sum * R * k / N`` makes the step's gradient
        that of ``sum(pair losses) / N``. Batches without a step count use the micro-batch mean.
        """
        if batch.window_pairs > 0:
            replicas, _ = data_parallel_info(self.trainer)
            return loss_sum * (replicas * self.trainer.accumulate_grad_batches / batch.window_pairs)
        return loss_sum / max(batch.num_pairs, 1)

    @override
    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor | None:
        logps, sums = self.pair_logps(batch)
        output = self.compute_loss(logps)

        # Adding 0 * sums keeps every parameter in the graph when this rank has only fillers.
        loss_sum = output.losses.sum() + 0.0 * sums.sum()
        loss = self.check_finite(self.normalise(loss_sum, batch), batch_idx)
        if loss is None:
            return None

        if batch.num_pairs > 0:
            for name, value in pair_metrics(output, logps).items():
                self.log(
                    f"train/{name}",
                    value,
                    prog_bar=name in ("loss", "rewards/accuracies"),
                    batch_size=batch.num_pairs,
                )
        self.log_throughput(batch.num_tokens)
        return loss

    # ------------------------------------------------------------ evaluation

    @override
    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        logps, _ = self.pair_logps(batch)
        if batch.num_pairs == 0:
            return
        output = self.compute_loss(logps)
        for name, value in pair_metrics(output, logps).items():
            self.eval_metrics[_metric_key(name)].update(value, weight=batch.num_pairs)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics()

    @override
    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics()

    def _log_eval_metrics(self) -> None:
        for name in self._metric_names():
            metric = self.eval_metrics[_metric_key(name)]
            if metric.update_count == 0 and not self.trainer.world_size > 1:
                continue
            self.log(
                f"{self._eval_prefix}/{name}",
                metric.compute(),
                prog_bar=name == "rewards/accuracies",
            )
            metric.reset()

    def _metric_names(self) -> tuple[str, ...]:
        return PAIR_METRICS + tuple(self.loss_fn.extra_metrics)

    # ------------------------------------------------- reference log-probs

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference == "precomputed":
            self._prepare_reference(fitting=True)

    @override
    def on_validation_start(self) -> None:
        self._eval_prefix = "val"
        if self.reference == "precomputed" and self.trainer.state.fn != "fit":
            self._prepare_reference(fitting=False)

    @override
    def on_test_start(self) -> None:
        self._eval_prefix = "test"
        if self.reference == "precomputed":
            self._prepare_reference(fitting=False)

    def _prepare_reference(self, fitting: bool) -> None:
        """Put reference log-probabilities on every row: from a checkpoint, or by scoring them."""
        rows = _datamodule_rows(self.trainer)
        if self._loaded_reference is not None:
            _apply_reference(rows, self._loaded_reference)
            self._loaded_reference = None
            self._reference_scored = True
            return
        if fitting and self.trainer.ckpt_path is not None:
            raise ValueError(
                f"Resuming from {self.trainer.ckpt_path} with reference='precomputed', but the "
                f"checkpoint has no {REFERENCE_CHECKPOINT_KEY!r} entry, and the resumed policy is no "
                "longer the reference. Resume from a checkpoint written by a DPOModule with "
                "reference='precomputed', or start a new run."
            )
        if not fitting:  # validate or test alone reads no training pairs
            rows = {split: split_rows for split, split_rows in rows.items() if split != "train"}
        missing = sum(row.reference_chosen is None for split in rows.values() for row in split)
        if fitting or not self._reference_scored:
            self.score_reference(rows)
        elif missing:
            raise ValueError(
                f"{missing} rows have no reference log-probabilities and the policy has been "
                "trained, so it can no longer score them. Evaluate on the data module used for fit, "
                "or from a checkpoint of this run (ckpt_path=...)."
            )

    @torch.no_grad()
    def score_reference(self, rows: dict[str, list[PreferenceRow]]) -> None:
        """Score rows with the current policy and store the values as reference log-probabilities.

        Every rank must call this: the rows are split over data-parallel ranks, each rank scores
        its share and the results are gathered onto every rank.

        Args:
            rows: Lists of rows by split name (``"train"``, ``"val"``).
        """
        was_training = self.model.training
        self.model.eval()
        for split, split_rows in rows.items():
            if not split_rows:
                continue
            self._score_split(split_rows)
            if self.global_rank == 0:
                log.info(
                    "Scored %d %s pairs with the initial policy as reference.",
                    len(split_rows),
                    split,
                )
        self.model.train(was_training)
        self._reference_scored = True

    def _score_split(self, rows: list[PreferenceRow]) -> None:
        replicas, rank = data_parallel_info(self.trainer)
        share = math.ceil(len(rows) / replicas)
        mine = list(range(rank * share, min(len(rows), (rank + 1) * share)))
        # Columns: row index (-1 for none), chosen log-prob, rejected log-prob.
        results = torch.full((share, 3), -1.0, dtype=torch.float64, device=self.device)
        for start in range(0, share, self.reference_batch_size):
            indices = mine[start : start + self.reference_batch_size]
            chunk = [rows[i] for i in indices]
            # Sharded models need every rank in every forward pass, so a rank with fewer rows pads
            # its chunk with fillers and all ranks run the same passes.
            size = min(self.reference_batch_size, share - start)
            chunk += [
                PreferenceRow(
                    rows[0].prompt_ids, rows[0].chosen_ids, rows[0].rejected_ids, is_filler=True
                )
            ] * (size - len(chunk))
            batch = move_data_to_device(
                collate_pairs(chunk, self.tokenizer.pad_token_id), self.device
            )
            sums = self(batch)  # [2 * size]
            count = len(indices)
            results[start : start + count, 0] = torch.tensor(
                indices, dtype=torch.float64, device=self.device
            )
            results[start : start + count, 1] = sums[:count].double()
            results[start : start + count, 2] = sums[size : size + count].double()
        gathered = self.all_gather(results).reshape(-1, 3).cpu()
        for index, chosen, rejected in gathered.tolist():
            if index >= 0:
                rows[int(index)].reference_chosen = chosen
                rows[int(index)].reference_rejected = rejected

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference != "precomputed" or not self._reference_scored:
            return
        rows = _datamodule_rows(self.trainer)
        checkpoint[REFERENCE_CHECKPOINT_KEY] = {
            split: torch.tensor(
                [[row.reference_chosen, row.reference_rejected] for row in split_rows],
                dtype=torch.float64,
            )
            for split, split_rows in rows.items()
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._loaded_reference = checkpoint.get(REFERENCE_CHECKPOINT_KEY)


# --------------------------------------------------------------------------- helpers


def pair_metrics(output: PreferenceLossOutput, logps: PairLogps) -> dict[str, Tensor]:
    """Return the mean over pairs of each logged metric (see :data:`PAIR_METRICS`).

    Args:
        output: The loss output of some pairs.
        logps: Their log-probabilities.

    Returns:
        Scalar tensors by metric name, without gradient.
    """
    chosen, rejected = output.chosen_rewards, output.rejected_rewards
    metrics = {
        "loss": output.losses.detach().mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": logps.chosen.detach().mean(),
        "logps/rejected": logps.rejected.detach().mean(),
    }
    metrics.update({name: value.mean() for name, value in output.extras.items()})
    return metrics


def _metric_key(name: str) -> str:
    return name.replace("/", "__")


def _resolve_loss(
    loss: str | PreferenceLoss, beta: float | None, options: dict[str, Any] | None
) -> PreferenceLoss:
    if isinstance(loss, PreferenceLoss):
        if beta is not None or options:
            raise ValueError(
                f"loss is the object {loss!r}, so beta={beta} and loss_options={options} would not "
                "reach it. Set them on the loss object, or pass the loss by name."
            )
        return loss
    options = dict(options or {})
    if beta is not None:
        options["beta"] = beta
    return build_preference_loss(loss, **options)


def _resolve_reference(reference: str | None, loss: PreferenceLoss) -> str:
    if reference is None:
        return "precomputed" if loss.needs_reference else "none"
    if reference not in _REFERENCE_MODES:
        raise ValueError(f"reference={reference!r} is not one of {list(_REFERENCE_MODES)}.")
    if loss.needs_reference and reference == "none":
        raise ValueError(
            f"The {loss.name!r} loss compares the policy with a reference model, so reference='none' "
            "cannot work. Use 'precomputed' or 'live', or a reference-free loss ('simpo', 'orpo')."
        )
    if not loss.needs_reference and reference != "none":
        raise ValueError(
            f"The {loss.name!r} loss is reference-free, so reference={reference!r} would compute "
            "values it never uses. Set reference='none' or leave it unset."
        )
    return reference


def _datamodule_rows(trainer: Any) -> dict[str, list[PreferenceRow]]:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "train_rows"):
        raise ValueError(
            "reference='precomputed' scores the rows of the data module before training, but the "
            "trainer has no data module with `train_rows`. Pass a PreferenceDataModule as "
            "datamodule=..., or set reference='live'."
        )
    return {"train": datamodule.train_rows, "val": getattr(datamodule, "val_rows", [])}


def _apply_reference(rows: dict[str, list[PreferenceRow]], stored: dict[str, Tensor]) -> None:
    for split, split_rows in rows.items():
        values = stored.get(split)
        if values is None or len(values) != len(split_rows):
            found = None if values is None else len(values)
            raise ValueError(
                f"The checkpoint contains reference log-probabilities for {found} {split} pairs, but the "
                f"data module has {len(split_rows)}. Resume with the same data and data settings."
            )
        for row, (chosen, rejected) in zip(split_rows, values.tolist()):
            row.reference_chosen, row.reference_rejected = chosen, rejected


def _custom_loss_ops_enabled() -> bool:
    # NOTE: reads a private table of torch.distributed.tensor (2.13), the only record of whether
    # loss_parallel() is active. Nesting loss_parallel() is wrong because leaving the inner one
    # switches the sharded cross entropy off for the outer one too.
    from torch.distributed.tensor.parallel.loss import customized_loss_ops

    handlers = DTensor._op_dispatcher._custom_op_handlers
    return all(op in handlers for op in customized_loss_ops)


def _loss_parallel_for(logits: Tensor) -> AbstractContextManager:
    """Return ``loss_parallel()`` for sharded logits outside it, else a no-op context.

    Raises:
        RuntimeError: For sharded logits outside ``loss_parallel()`` while gradients are on, since
            their backward pass would then run without the sharded cross entropy.
    """
    if not isinstance(logits, DTensor) or _custom_loss_ops_enabled():
        return nullcontext()
    if torch.is_grad_enabled():
        raise RuntimeError(
            "The logits are vocabulary-sharded but the training step does not run inside "
            "loss_parallel(). Train under lit_tune.strategies.FSDP2Strategy, which enters it."
        )
    return loss_parallel()


__all__ = ["PAIR_METRICS", "REFERENCE_CHECKPOINT_KEY", "DPOModule", "pair_metrics"]
