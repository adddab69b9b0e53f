"""``GRPOModule``: group-relative policy optimisation with verifiable rewards.

Each training step takes a micro-batch of prompts and samples ``group_size`` completions per
prompt from the policy. Reward functions score them, the rewards are normalised within each group
into advantages, and the step minimises the clipped policy-gradient loss, with an optional k3 KL
penalty to a frozen copy of the initial policy. Generation runs in the trainer (``mode="sync"``) or in a worker
process beside it (``mode="async"``, see :mod:`lit_tune.rl.async_worker`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_tune.data.sft import data_parallel_info
from lit_tune.losses import IGNORE_INDEX, shift_labels, token_log_probs
from lit_tune.losses.policy import ClippedPolicyLoss, LossAverage, PolicyLossTerms
from lit_tune.modules.base import CausalLMModule
from lit_tune.optim import WarmupCosine
from lit_tune.rl.async_worker import (
    AsyncRolloutLoader,
    WorkerSpec,
    check_picklable,
    full_state_items,
)
from lit_tune.rl.rewards import RewardFunction, RewardSet, reward_path
from lit_tune.rl.rollout import (
    GenerationConfig,
    PromptBatch,
    RolloutBatch,
    collate_rollouts,
    sample_completions,
    score_completions,
)

log = logging.getLogger(__name__)

Mode = Literal["sync", "async"]


class GRPOModule(CausalLMModule):
    """GRPO: clipped policy gradient on group-normalised verifiable rewards.

    Train it with :class:`~lit_tune.data.prompts.PromptDataModule`, whose loader this module turns
    into rollouts (:meth:`rollout_loader`).

    *Loss averaging* (``loss_average``): with ``"token"``, every completion token of a micro-batch
    weighs the same over all data-parallel ranks. With ``"sequence"``, each completion's tokens are
    averaged first, and every completion weighs the same. The normaliser is the count of the
    micro-batch summed over data-parallel ranks (one all-reduce per step when there are several),
    because completion lengths are only known after generation. So with
    ``accumulate_grad_batches=1`` the rule holds for the whole optimizer step, and with more each
    micro-batch weighs the same.

    *Importance ratios*: in synchronous mode the data comes from the current policy, so the old
    log-probabilities are the current ones, detached (ratio 1). In asynchronous mode they are the
    ones the worker sampled with, so data from an older policy version is corrected off-policy.

    Logged every step (prefix ``train/``): ``loss``, ``reward_mean``, ``reward_std``,
    ``rewards/<name>_mean`` and ``_std`` per reward function, ``kl`` (with a reference),
    ``clip_fraction``, ``ratio_max``, ``completion_length``, ``truncated_fraction``,
    ``zero_spread_groups``, ``generation_tokens_per_sec``, ``policy_lag``, ``tokens_per_sec``, and
    in asynchronous mode ``queue_depth`` and ``dropped_stale``.

    Args:
        rewards: Reward functions, built-in names (``"numeric_match"``,
            ``"final_answer_format"``, ``"starts_with_number"``) or import paths.
        reward_weights: Weight of each reward in the total; all 1.0 when None.
        group_size: Completions sampled per prompt.
        max_new_tokens: Maximum completion length, in tokens; generation also stops at EOS.
        temperature: Sampling temperature; the loss scores tokens at the same temperature.
        clip_eps: Lower clip range of the importance ratio.
        clip_eps_high: Upper clip range; ``clip_eps`` when None.
        kl_coef: Weight of the k3 KL penalty to a frozen copy of the initial policy; 0 builds no
            reference model.
        loss_average: ``"token"`` or ``"sequence"`` (see above).
        scale_rewards: Divide group-centred rewards by the group's standard deviation.
        std_floor: Smallest standard deviation divided by, in reward units.
        mode: ``"sync"`` generates in the trainer before each step; ``"async"`` generates in a
            worker process that feeds a bounded queue.
        max_staleness: Async: largest accepted lag between the trainer's policy version and the
            version that generated a rollout; older rollouts are dropped and counted. Must be at
            least ``sync_every - 1``, or no rollout could ever be fresh enough.
        sync_every: Async: send the weights to the worker every this many optimizer steps.
        queue_size: Async: rollout micro-batches the queue holds before the worker waits. When
            the worker is faster than the trainer, a batch waits about ``queue_size`` micro-batches
            in the queue, so more than ``max_staleness * accumulate_grad_batches`` wastes
            generation on batches that will be dropped (a warning says so).
        worker_threads: Async: ``torch.set_num_threads`` of the worker process.
        seed: Seed of the sampling; rank ``r`` of a data-parallel run uses ``seed + r``.
        **kwargs: Model, tokenizer, optimizer and export options of
            :class:`~lit_tune.modules.base.CausalLMModule`.

    Raises:
        ValueError: On invalid settings; the message lists every problem.

    Example::

        module = GRPOModule(model="out/sft", rewards=["numeric_match", "final_answer_format"],
                            reward_weights=[1.0, 0.1], group_size=8, mode="async")
        trainer = L.Trainer(max_steps=200)
        trainer.fit(module, datamodule=PromptDataModule(path="data/gsm8k/train.jsonl"))
    """

    def __init__(
        self,
        *args: Any,
        rewards: list[str | RewardFunction] | tuple[str, ...] = ("numeric_match",),
        reward_weights: list[float] | None = None,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.0,
        loss_average: LossAverage = "token",
        scale_rewards: bool = True,
        std_floor: float = 1e-4,
        mode: Mode = "sync",
        max_staleness: int = 1,
        sync_every: int = 1,
        queue_size: int = 1,
        worker_threads: int = 1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_args(group_size, max_new_tokens, temperature, std_floor, mode, max_staleness, sync_every, queue_size, worker_threads)
        self.rewards = RewardSet(list(rewards), reward_weights)
        # Import paths instead of function objects keep hparams YAML-friendly and let checkpoints
        # load with torch.load(weights_only=True).
        self.hparams["rewards"] = [reward_path(function) for function in self.rewards.functions]
        self._hparams_initial["rewards"] = list(self.hparams["rewards"])
        if mode == "async":
            check_picklable(self.rewards)  # fail now rather than when the worker starts
        self.policy_loss = ClippedPolicyLoss(clip_eps, clip_eps_high, kl_coef, loss_average)
        self.ref_model: nn.Module | None = None
        self.rollouts: AsyncRolloutLoader | None = None
        if group_size == 1:
            rank_zero_warn("group_size=1 gives every completion an advantage of 0, so nothing is learned; use 2 or more.")

    # ----------------------------------------------------------------- model

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.policy_loss.kl_coef > 0:
            # A copy of the initial policy: on_fit_start copies the policy's weights into it again,
            # which also covers weights that a sharding strategy loads after this hook.
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        resuming = self.trainer.ckpt_path is not None
        if self.ref_model is not None and not resuming:
            with torch.no_grad():
                for ref, policy in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
                    ref.copy_(policy)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        # Only the policy is trained; the frozen reference has no gradients.
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def generation_config(self) -> GenerationConfig:
        """Sampling settings of this module."""
        return GenerationConfig(
            group_size=self.hparams.group_size,
            max_new_tokens=self.hparams.max_new_tokens,
            temperature=self.hparams.temperature,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    # ----------------------------------------------------------- rollouts

    def rollout_loader(self, prompts: Any) -> Any:
        """Return the training loader for a prompt loader: itself (sync) or a rollout loader (async).

        :class:`~lit_tune.data.prompts.PromptDataModule` calls this from ``train_dataloader``.

        Args:
            prompts: A :class:`~lit_tune.data.prompts.PromptLoader` for this rank.
        """
        if self.hparams.mode == "sync":
            return prompts
        if self.rollouts is not None:
            self.rollouts.close()
        self._check_queue_size()
        _, rank = data_parallel_info(self._trainer)
        spec = WorkerSpec(
            model_config=self.model.config,
            tokenizer=self.tokenizer,
            rewards=self.rewards,
            generation=self.generation_config,
            scale_by_std=self.hparams.scale_rewards,
            std_floor=self.hparams.std_floor,
            seed=self.hparams.seed + rank,
            num_threads=self.hparams.worker_threads,
            attn_implementation=self.hparams.attn_implementation,
            max_staleness=self.hparams.max_staleness,
        )
        self.rollouts = AsyncRolloutLoader(
            prompts,
            spec,
            state=lambda: full_state_items(self.model),
            current_version=lambda: self.global_step,
            pad_token_id=self.tokenizer.pad_token_id,
            max_staleness=self.hparams.max_staleness,
            queue_size=self.hparams.queue_size,
        )
        return self.rollouts

    def _check_queue_size(self) -> None:
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        hp = self.hparams
        if hp.queue_size > hp.max_staleness * accumulate:
            rank_zero_warn(
                f"queue_size={hp.queue_size} is above max_staleness={hp.max_staleness} x "
                f"accumulate_grad_batches={accumulate}: when generation is faster than training, "
                "rollouts wait in the queue until they are too old and are dropped. Lower "
                "queue_size or raise max_staleness."
            )

    @torch.no_grad()
    def generate_rollouts(self, batch: PromptBatch, batch_idx: int = 0) -> RolloutBatch:
        """Sample, score and collate completions for a prompt batch with the current policy (sync mode).

        Sampling is seeded by ``seed``, the step, the batch index and the rank, so a resumed run
        samples what the uninterrupted one would.

        Args:
            batch: Prompts of this micro-batch.
            batch_idx: Index of the micro-batch in the epoch.
        """
        _, rank = data_parallel_info(self._trainer)
        generator = torch.Generator(device=self.device)
        # The hash of a tuple of ints does not depend on PYTHONHASHSEED.
        generator.manual_seed(hash((self.hparams.seed, self.global_step, batch_idx, rank)) % (2**63))
        was_training = self.model.training
        self.model.eval()
        try:
            completions = sample_completions(
                self.model, [row.prompt_ids for row in batch.rows], self.generation_config, generator
            )
        finally:
            self.model.train(was_training)
        rollouts = score_completions(
            batch.rows,
            completions,
            self.tokenizer,
            self.rewards,
            self.generation_config,
            scale_by_std=self.hparams.scale_rewards,
            std_floor=self.hparams.std_floor,
        )
        rollouts.policy_version = self.global_step
        rollout_batch = collate_rollouts(rollouts, self.tokenizer.pad_token_id, current_version=self.global_step)
        return _to_device(rollout_batch, self.device)

    # ----------------------------------------------------------- training

    @override
    def training_step(self, batch: PromptBatch | RolloutBatch, batch_idx: int) -> Tensor | None:
        if isinstance(batch, PromptBatch):
            if self.hparams.mode == "async":
                raise RuntimeError(
                    "mode='async' received prompts instead of rollouts, so its training loader was not "
                    "made by GRPOModule.rollout_loader. Train with PromptDataModule, or pass "
                    "module.rollout_loader(prompt_loader) as the train dataloader."
                )
            batch = self.generate_rollouts(batch, batch_idx)
        terms = self.compute_loss(batch)
        loss = self.check_finite(self.normalise(terms), batch_idx)
        if loss is None:
            return None
        self._log_step(batch, terms)
        return loss

    def compute_loss(self, batch: RolloutBatch) -> PolicyLossTerms:
        """Return the summed policy loss of a rollout batch; override to change the objective.

        Args:
            batch: Prompt and completion tokens, sampling log-probabilities and advantages.
        """
        targets = shift_labels(batch.labels)
        log_probs = self.sequence_log_probs(self.forward_logits(batch), targets)
        if self.hparams.mode == "sync":
            old_log_probs = log_probs.detach()
        else:
            old_log_probs = batch.old_log_probs
        ref_log_probs = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logits = self.ref_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
                ref_log_probs = self.sequence_log_probs(ref_logits, targets)
        mask = targets != IGNORE_INDEX
        return self.policy_loss(log_probs, old_log_probs, batch.advantages, mask, ref_log_probs)

    def sequence_log_probs(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Return the log-probabilities ``[batch, seq_len]`` of ``targets`` at the sampling temperature.

        Ignored positions get 0.
        """
        temperature = self.hparams.temperature
        if temperature != 1.0:
            logits = logits / temperature
        return token_log_probs(logits, targets)

    def normalise(self, terms: PolicyLossTerms) -> Tensor:
        """Divide the summed loss by its count over all data-parallel ranks (see the class docstring).

        Data parallelism averages gradients over ``R`` ranks, so with ``N`` tokens (or sequences)
        in the micro-batch over all ranks, ``loss_sum * R / N`` gives every one weight ``1/N``.
        """
        replicas, _ = data_parallel_info(self._trainer)
        count = terms.count.detach().float()
        world_size = self._trainer.world_size if self._trainer is not None else 1
        if world_size > 1:
            # Ranks of the same data-parallel replica (tensor parallel) hold the same rollouts.
            count = self.trainer.strategy.reduce(count, reduce_op="sum") * replicas / world_size
        return terms.loss_sum * replicas / count.clamp(min=1.0)

    def _log_step(self, batch: RolloutBatch, terms: PolicyLossTerms) -> None:
        tokens = terms.num_tokens.clamp(min=1.0)
        size = len(batch)
        self.log("train/loss", terms.loss_sum.detach() / terms.count.clamp(min=1.0), prog_bar=True, batch_size=size)
        self.log("train/clip_fraction", terms.clipped_tokens / tokens, batch_size=size)
        self.log("train/ratio_max", terms.ratio_max, batch_size=size)
        if self.ref_model is not None:
            self.log("train/kl", terms.kl_sum / tokens, batch_size=size)
        for name, value in batch.stats.items():
            self.log(f"train/{name}", float(value), prog_bar=name == "reward_mean", batch_size=size)
        self.log_throughput(batch.num_tokens)

    # ------------------------------------------------------- worker control

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        rollouts = self.rollouts
        if rollouts is None or self.global_step == rollouts.published_version:
            return
        if self.global_step % self.hparams.sync_every == 0:
            rollouts.publish(self.global_step)

    @override
    def on_train_end(self) -> None:
        self.stop_rollouts()

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return [_StopRolloutsOnException()]

    def stop_rollouts(self) -> None:
        """Stop the generation worker of asynchronous mode, if one runs."""
        if self.rollouts is not None:
            self.rollouts.close()


class _StopRolloutsOnException(L.Callback):
    """Stops the generation worker when ``fit`` fails or is interrupted (modules get no such hook)."""

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, GRPOModule):
            pl_module.stop_rollouts()


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    for name in ("input_ids", "labels", "attention_mask", "old_log_probs", "advantages"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


def _check_args(
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    std_floor: float,
    mode: str,
    max_staleness: int,
    sync_every: int,
    queue_size: int,
    worker_threads: int,
) -> None:
    problems = []
    if group_size < 1:
        problems.append(f"group_size={group_size} must be at least 1.")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if not temperature > 0:
        problems.append(f"temperature={temperature} must be positive.")
    if not std_floor > 0:
        problems.append(f"std_floor={std_floor} must be positive.")
    if mode not in ("sync", "async"):
        problems.append(f"mode={mode!r} must be 'sync' or 'async'.")
    if sync_every < 1:
        problems.append(f"sync_every={sync_every} must be at least 1.")
    if max_staleness < max(sync_every - 1, 0):
        problems.append(
            f"max_staleness={max_staleness} is below sync_every - 1 = {sync_every - 1}: between weight "
            "updates the worker's rollouts grow that stale, so none would be accepted. Raise "
            "max_staleness or lower sync_every."
        )
    if queue_size < 1:
        problems.append(f"queue_size={queue_size} must be at least 1.")
    if worker_threads < 1:
        problems.append(f"worker_threads={worker_threads} must be at least 1.")
    if problems:
        raise ValueError("Invalid GRPOModule arguments: " + " ".join(problems))


__all__ = ["GRPOModule"]
