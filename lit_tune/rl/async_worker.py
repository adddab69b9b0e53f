"""Asynchronous rollouts: a generation worker process, shared-memory weights and a bounded queue.

The trainer and the worker are separate processes (``spawn`` start method), so generation and
training run in parallel with their own threads and no shared interpreter lock:

- :class:`SharedWeights` keeps one copy of the policy's weights in shared memory, with the
  *policy version* (optimizer steps taken) they belong to. The trainer publishes new weights every
  ``sync_every`` steps; the worker loads them before each generation batch, under a lock, so it
  never reads a half-written copy.
- The worker samples a group of completions for each prompt of a batch, scores them and puts the
  :class:`~lit_tune.rl.rollout.Rollouts`, tagged with the policy version that produced them, into
  a bounded queue. When the queue is full, it waits.
- :class:`AsyncRolloutLoader` is what the trainer iterates, as it would a dataloader. It drops and
  counts rollouts more than ``max_staleness`` versions older than the trainer's policy, re-raises
  an exception of the worker with its original type and message, and stops the worker on
  :meth:`~AsyncRolloutLoader.close`. The worker also exits on its own when the trainer process
  dies, so it is never orphaned.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from lit_tune.rl.rewards import RewardSet
from lit_tune.rl.rollout import (
    GenerationConfig,
    PromptBatch,
    RolloutBatch,
    Rollouts,
    collate_rollouts,
    sample_completions,
    score_completions,
)

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1


@dataclass
class WorkerSpec:
    """Everything the generation worker needs; it is pickled into the worker process.

    Attributes:
        model_config: Configuration the worker builds its copy of the policy from.
        tokenizer: Decodes completions for the reward functions.
        rewards: The reward functions; they must be picklable (module-level functions).
        generation: Sampling settings.
        scale_by_std: See :func:`~lit_tune.rl.advantages.group_advantages`.
        std_floor: See :func:`~lit_tune.rl.advantages.group_advantages`.
        seed: Seed of the worker's sampling generator.
        num_threads: Intra-op threads of the worker (``torch.set_num_threads``).
        attn_implementation: transformers attention kernel of the worker's model.
        max_staleness: Rollouts that fall this many versions behind the published weights while
            they wait for room in the queue are generated again.
    """

    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    rewards: RewardSet
    generation: GenerationConfig
    scale_by_std: bool = True
    std_floor: float = 1e-4
    seed: int = 0
    num_threads: int = 1
    attn_implementation: str = "sdpa"
    max_staleness: int = 1


class SharedWeights:
    """A state dict in shared memory, with the policy version it belongs to.

    Tensors of the same dtype are packed into one flat shared buffer, so passing the weights to the
    worker costs one file descriptor per dtype whatever the number of parameters.

    Args:
        state: Names and tensors of the state dict (values are only read for shape and dtype).
        context: The multiprocessing context the worker is started with.
    """

    def __init__(self, state: Iterable[tuple[str, Tensor]], context: Any) -> None:
        self.layout: dict[str, tuple[torch.dtype, int, torch.Size]] = {}
        sizes: dict[torch.dtype, int] = {}
        for name, tensor in state:
            offset = sizes.get(tensor.dtype, 0)
            self.layout[name] = (tensor.dtype, offset, tensor.shape)
            sizes[tensor.dtype] = offset + tensor.numel()
        self.buffers = {dtype: torch.zeros(size, dtype=dtype).share_memory_() for dtype, size in sizes.items()}
        self.version = context.Value("q", -1, lock=False)
        self.lock = context.Lock()

    def view(self, name: str) -> Tensor:
        """Return the shared tensor of the state-dict entry ``name``."""
        dtype, offset, shape = self.layout[name]
        return self.buffers[dtype][offset : offset + math.prod(shape)].view(shape)

    def publish(self, state: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Copy ``state`` into shared memory and mark it as ``version``.

        Args:
            state: Names and full (unsharded) tensors; consumed one at a time, so a generator
                that gathers each tensor only when asked keeps memory low.
            version: Policy version of the weights.

        Raises:
            KeyError: If a name is not part of the layout the buffers were made for.
        """
        with self.lock:
            for name, tensor in state:
                self.view(name).copy_(tensor.detach())
            self.version.value = version

    def load_into(self, model: nn.Module, known_version: int) -> int:
        """Copy the shared weights into ``model`` if they are newer than ``known_version``.

        Returns:
            The version ``model`` now holds.
        """
        if self.version.value == known_version:
            return known_version
        with self.lock, torch.no_grad():
            model.load_state_dict({name: self.view(name) for name in self.layout}, strict=True)
            return self.version.value


@dataclass
class _WorkerFailure:
    """An exception of the worker, with its formatted traceback."""

    error: BaseException
    traceback: str


class _RemoteTraceback(Exception):
    """Chained under a re-raised worker exception, to show where in the worker it was raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)

    def __str__(self) -> str:
        return f"\n\nTraceback in the rollout worker:\n{self.args[0]}"


def _encode_failure(error: BaseException) -> bytes:
    """Pickle ``error``; one that cannot be pickled becomes a RuntimeError with the same text."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        payload = pickle.dumps(_WorkerFailure(error, text))
        pickle.loads(payload)  # an exception class with an unusual __init__ may fail only here
        return payload
    except Exception:
        fallback = RuntimeError(f"{type(error).__name__}: {error}")
        return pickle.dumps(_WorkerFailure(fallback, text))


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


class _Outcome:
    """Outcome of the worker's attempt to queue a batch of rollouts."""

    QUEUED = "queued"
    STALE = "stale"
    STOPPED = "stopped"


def _put(rollout_queue: Any, item: Rollouts, weights: SharedWeights, max_staleness: int, stop: Any) -> str:
    """Put ``item`` into the bounded queue, waiting while it is full.

    Newer weights may be published while it waits. Once ``item`` is more than ``max_staleness``
    versions behind them, the trainer would drop it anyway, so the worker discards it and
    generates again with the new weights.

    Returns:
        One of the ``_Outcome`` values.
    """
    while not stop.is_set() and _parent_alive():
        if weights.version.value - item.policy_version > max_staleness:
            return _Outcome.STALE
        try:
            rollout_queue.put(item, timeout=_POLL_SECONDS)
            return _Outcome.QUEUED
        except queue.Full:
            continue
    return _Outcome.STOPPED


def _wait_for_room(rollout_queue: Any, stop: Any) -> bool:
    """Wait until the queue has room before generating; return False on a stop request first.

    Generating only when the result can be queued at once keeps the worker from holding a finished
    batch while the trainer moves on, which would make that batch one version older.
    """
    while not stop.is_set() and _parent_alive():
        try:
            if not rollout_queue.full():
                return True
        except NotImplementedError:  # no sem_getvalue (macOS): rely on the blocking put
            return True
        time.sleep(_POLL_SECONDS / 10)
    return False


def _build_worker_model(spec: WorkerSpec) -> nn.Module:
    # NOTE: the copy is built from the config alone, so changes that an overridden
    # CausalLMModule.build_model makes beyond the config do not reach the worker.
    model = AutoModelForCausalLM.from_config(spec.model_config, attn_implementation=spec.attn_implementation)
    return model.eval()


def _generate(spec: WorkerSpec, model: nn.Module, batch: PromptBatch, generator: torch.Generator) -> Rollouts:
    prompts = [row.prompt_ids for row in batch.rows]
    completions = sample_completions(model, prompts, spec.generation, generator)
    return score_completions(
        batch.rows,
        completions,
        spec.tokenizer,
        spec.rewards,
        spec.generation,
        scale_by_std=spec.scale_by_std,
        std_floor=spec.std_floor,
    )


def _worker_main(
    spec: WorkerSpec,
    prompts: Iterable[PromptBatch],
    weights: SharedWeights,
    rollout_queue: Any,
    error_queue: Any,
    stop: Any,
) -> None:
    """Generate rollouts until the stop event is set or the trainer process is gone (worker side)."""
    # Unsent rollouts may be dropped at exit: the trainer no longer wants them then.
    rollout_queue.cancel_join_thread()
    try:
        torch.set_num_threads(spec.num_threads)
        model = _build_worker_model(spec)
        generator = torch.Generator().manual_seed(spec.seed)
        version, discarded = -1, 0
        while not stop.is_set() and _parent_alive():
            # One pass over the prompts is one epoch; the worker runs as many as the trainer needs.
            for batch in prompts:
                outcome = _Outcome.STALE
                while outcome == _Outcome.STALE:
                    if not _wait_for_room(rollout_queue, stop):
                        return
                    version = weights.load_into(model, version)
                    rollouts = _generate(spec, model, batch, generator)
                    rollouts.policy_version, rollouts.stale_discarded = version, discarded
                    rollouts.prompt_state = _loader_state(prompts)
                    outcome = _put(rollout_queue, rollouts, weights, spec.max_staleness, stop)
                    discarded += outcome == _Outcome.STALE
                if outcome == _Outcome.STOPPED:
                    return
                discarded = 0
    except BaseException as error:  # every failure must reach the trainer, KeyboardInterrupt too
        error_queue.put(_encode_failure(error))


def _loader_state(loader: Any) -> dict | None:
    state_dict = getattr(loader, "state_dict", None)
    return state_dict() if callable(state_dict) else None


class AsyncRolloutLoader:
    """Rollouts from a generation worker process, consumed by the trainer as a dataloader.

    The worker starts at the first ``iter()`` and keeps running across epochs. Each batch is the
    rollouts of one prompt micro-batch, all produced by one policy version. A batch whose version
    lags the trainer's (``current_version()``) by more than ``max_staleness`` is dropped and
    counted in :attr:`dropped_stale`. That count includes the batches that the worker discarded
    because they fell that far behind the published weights while waiting for room in the queue.
    Lightning fetches the next batch right before each training step when the loader has a
    length (as this one does), so the lag checked here is the lag trained on.

    When ``prompts`` has ``state_dict``/``load_state_dict`` (as ``PromptLoader`` has), checkpoints
    record the position after the last prompt batch the trainer took, dropped batches included.
    A resumed worker starts there: rollouts that were still queued are generated again, so no
    prompt is skipped or taken twice.

    Args:
        prompts: Prompt micro-batches for this rank; the worker iterates them epoch after epoch.
        spec: Model, tokenizer, rewards and sampling settings of the worker.
        state: Callable returning the policy's full state dict as ``(name, tensor)`` pairs; it is
            called to size the shared buffers and at each :meth:`publish`.
        current_version: Callable returning the trainer's policy version (optimizer steps taken).
        pad_token_id: Padding id of collated batches.
        max_staleness: Largest accepted lag, in policy versions.
        queue_size: Rollout micro-batches the queue holds before the worker waits.
        stop_timeout: Seconds :meth:`close` waits for the worker before terminating it.

    Raises:
        ValueError: On ``max_staleness < 0`` or ``queue_size < 1``.
    """

    def __init__(
        self,
        prompts: Any,
        spec: WorkerSpec,
        state: Callable[[], Iterator[tuple[str, Tensor]]],
        current_version: Callable[[], int],
        pad_token_id: int,
        *,
        max_staleness: int = 1,
        queue_size: int = 1,
        stop_timeout: float = 10.0,
    ) -> None:
        if max_staleness < 0 or queue_size < 1:
            raise ValueError(
                f"max_staleness={max_staleness} must be >= 0 and queue_size={queue_size} must be >= 1."
            )
        self.prompts = prompts
        self.spec = spec
        self.state = state
        self.current_version = current_version
        self.pad_token_id = pad_token_id
        self.max_staleness = max_staleness
        self.queue_size = queue_size
        self.stop_timeout = stop_timeout
        self.dropped_stale = 0
        self.published_version = -1
        self._prompt_state: dict | None = None
        self._taken_in_epoch = 0
        self._batches_taken = 0
        self.process: Any = None
        self._context = multiprocessing.get_context("spawn")
        self._weights: SharedWeights | None = None
        self._rollouts: Any = None
        self._errors: Any = None
        self._stop: Any = None

    def __len__(self) -> int:
        return len(self.prompts)

    def state_dict(self) -> dict[str, Any]:
        """Prompt-loader position after the last batch taken, and the batches taken this epoch."""
        prompts = self._prompt_state if self._prompt_state is not None else _loader_state(self.prompts)
        # After an epoch's last batch the next run starts a new epoch, as ResumableBatchLoader does.
        taken = self._taken_in_epoch % len(self) if len(self) else 0
        return {"prompts": dict(prompts or {}), "taken_in_epoch": taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved prompt position; the worker restarts there if it already runs.

        Raises:
            RuntimeError: If batches were already taken from this loader.
        """
        if self._batches_taken:
            raise RuntimeError(
                f"load_state_dict was called after {self._batches_taken} rollout batches were taken; call it before training."
            )
        if self.process is not None:
            # Lightning's setup calls iter(), which starts the worker, before it restores state.
            self.close()
        if state.get("prompts"):
            self.prompts.load_state_dict(state["prompts"])
            self._prompt_state = dict(state["prompts"])
        self._taken_in_epoch = state.get("taken_in_epoch", 0)

    def __iter__(self) -> Iterator[RolloutBatch]:
        # Start at iter(), not at the first next(): Lightning calls iter() during its setup, so
        # the worker loads while the trainer still prepares.
        self.start()
        return self._batches()

    def _batches(self) -> Iterator[RolloutBatch]:
        # A run resumed mid-epoch yields only the rest of that epoch, like ResumableBatchLoader.
        self._taken_in_epoch = self._taken_in_epoch % len(self) if len(self) else 0
        for _ in range(self._taken_in_epoch, len(self)):
            batch = self.next_batch()
            self._taken_in_epoch += 1
            yield batch

    # ------------------------------------------------------------ worker control

    def start(self) -> None:
        """Publish the current weights and start the worker; does nothing if it is running.

        Under a sharding strategy every rank must call it (gathering the weights is a collective).

        Raises:
            RuntimeError: If the worker was started before and has stopped.
        """
        if self.process is not None:
            if not self.process.is_alive():
                self._raise_worker_failure()
            return
        check_picklable(self.spec)
        self._weights = SharedWeights(self.state(), self._context)
        self.publish(self.current_version())
        self._rollouts = self._context.Queue(maxsize=self.queue_size)
        self._errors = self._context.Queue()
        self._stop = self._context.Event()
        self.process = self._context.Process(
            target=_worker_main,
            args=(self.spec, self.prompts, self._weights, self._rollouts, self._errors, self._stop),
            name="lit-tune-rollout-worker",
            daemon=True,
        )
        self.process.start()
        log.info("Started rollout worker (pid %d).", self.process.pid)

    def publish(self, version: int) -> None:
        """Send the policy's current weights to the worker as ``version``.

        Every rank must call it under a sharding strategy (it gathers the full weights).
        """
        if self._weights is None:
            return
        self._weights.publish(self.state(), version)
        self.published_version = version

    def close(self) -> None:
        """Stop the worker and release the queues; safe to call more than once."""
        process, self.process = self.process, None
        if process is None:
            return
        self._stop.set()
        deadline = time.monotonic() + self.stop_timeout
        while process.is_alive() and time.monotonic() < deadline:
            self._drain()  # a worker blocked on a full pipe cannot see the stop event
            process.join(timeout=_POLL_SECONDS)
        if process.is_alive():
            log.warning("Rollout worker (pid %d) did not stop within %.0f s; terminating it.", process.pid, self.stop_timeout)
            process.terminate()
            process.join(timeout=self.stop_timeout)
        if process.is_alive():
            process.kill()
            process.join()
        process.close()
        for channel in (self._rollouts, self._errors):
            channel.close()
            channel.join_thread()
        log.info("Stopped rollout worker.")

    def _drain(self) -> None:
        try:
            while True:
                self._rollouts.get_nowait()
        except queue.Empty:
            pass

    # --------------------------------------------------------------- consuming

    def queue_depth(self) -> int:
        """Rollout micro-batches waiting in the queue (approximate, as multiprocessing reports it)."""
        try:
            return self._rollouts.qsize() if self._rollouts is not None else 0
        except NotImplementedError:  # macOS has no sem_getvalue
            return -1

    def next_batch(self) -> RolloutBatch:
        """Return the next rollout batch no older than ``max_staleness`` versions, dropping older ones.

        Raises:
            BaseException: The worker's exception, with its original type and message.
            RuntimeError: If the worker exited without reporting an exception.
        """
        while True:
            rollouts = self._get()
            self._prompt_state = rollouts.prompt_state
            self._batches_taken += 1
            self.dropped_stale += rollouts.stale_discarded
            current = self.current_version()
            if current - rollouts.policy_version > self.max_staleness:
                self.dropped_stale += 1
                log.debug("Dropped rollouts of version %d at version %d.", rollouts.policy_version, current)
                continue
            batch = collate_rollouts(rollouts, self.pad_token_id, current_version=current)
            batch.stats["queue_depth"] = float(self.queue_depth())
            batch.stats["dropped_stale"] = float(self.dropped_stale)
            return batch

    def _get(self) -> Rollouts:
        while True:
            if self.process is None:
                raise RuntimeError("The rollout worker is not running; iterate the loader to start it.")
            # A failure is raised before any rollouts still queued: training stops at once.
            if not self._errors.empty() or not self.process.is_alive():
                self._raise_worker_failure()
            try:
                return self._rollouts.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass

    def _raise_worker_failure(self) -> None:
        exitcode = self.process.exitcode if self.process is not None else None
        try:
            # The failure may still be in transit when the process is already gone.
            failure: _WorkerFailure | None = pickle.loads(self._errors.get(timeout=1.0))
        except queue.Empty:
            failure = None
        self.close()
        if failure is None:
            raise RuntimeError(
                f"The rollout worker exited with code {exitcode} without reporting an error. It may have "
                "been killed (for example out of memory; check the system log), or it failed while "
                "starting: a training script without an `if __name__ == \"__main__\":` guard is run "
                "again by every spawned process."
            )
        raise failure.error from _RemoteTraceback(failure.traceback)


def check_picklable(settings: Any) -> None:
    """Raise a clear error if ``settings`` cannot be sent to the spawned worker process.

    Args:
        settings: A :class:`WorkerSpec`, or a part of one such as a :class:`RewardSet`.

    Raises:
        ValueError: If pickling fails, typically because of a lambda or closure reward function.
    """
    try:
        pickle.dumps(settings)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ValueError(
            f"The rollout worker's settings cannot be pickled ({error}), so they cannot be sent to the "
            "worker process. Reward functions must be module-level functions, not lambdas or closures."
        ) from error


def full_state_items(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Yield the model's state dict as full CPU tensors, one at a time.

    Sharded entries (FSDP2 or tensor-parallel DTensors) are gathered with ``full_tensor()``, a
    collective, so every rank must iterate this generator to the end in the same order.
    """
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield name, full.detach().to("cpu")


__all__ = ["AsyncRolloutLoader", "SharedWeights", "WorkerSpec", "check_picklable", "full_state_items"]
