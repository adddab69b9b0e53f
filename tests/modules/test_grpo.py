"""GRPOModule trained with real Lightning Trainers on the tiny model, in both generation modes."""

import csv
import multiprocessing
import signal
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_tune.cli import LitTuneCLI
from lit_tune.data.prompts import PromptDataModule
from lit_tune.losses import IGNORE_INDEX, shift_labels, token_log_probs
from lit_tune.modules.grpo import GRPOModule
from lit_tune.rl.rollout import PromptBatch, RolloutBatch
from tests.conftest import cpu_trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASK_ROWS = [
    {"prompt": text, "answer": "7"} for text in ("Say 7.", "Reply 7.", "Write 7.", "Give 7.")
] * 16


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model gains nothing from intra-op threads, and on a busy machine idle OpenMP
    # threads spin and multiply the CPU time of a test several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class MetricRecorder(L.Callback):
    """Keeps the metrics logged at every training step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def series(self, name):
        return [step[name] for step in self.steps]


def _module(**kwargs):
    kwargs.setdefault("optimizer", _adamw)
    kwargs.setdefault("lr_scheduler", _constant)
    kwargs.setdefault("rewards", ["numeric_match"])
    kwargs.setdefault("group_size", 8)
    kwargs.setdefault("max_new_tokens", 2)
    return GRPOModule(model="tiny", export=False, **kwargs)


def _data(batch_size=4):
    # Plain-text prompts keep sequences short, so each step is cheap.
    return PromptDataModule(rows=TASK_ROWS, batch_size=batch_size, use_chat_template=False)


def _fit(module, steps, callbacks=(), batch_size=4):
    L.seed_everything(0)
    recorder = MetricRecorder()
    trainer = cpu_trainer(max_steps=steps, callbacks=[recorder, *callbacks], log_every_n_steps=1)
    trainer.fit(module, datamodule=_data(batch_size))
    return recorder


def _assert_reward_rises(rewards, window=5, margin=0.3):
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    assert last > first + margin, (
        f"mean reward of the first {window} steps {first:.3f}, of the last {last:.3f}"
    )


def _assert_no_worker_left(threads_before):
    assert multiprocessing.active_children() == []
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before


def _run_tiny_config(tmp_path, mode, steps=30):
    """Train configs/grpo_tiny.yaml through the command line and return its per-step metrics."""
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(OVERRIDES.format(steps=steps, out=tmp_path, mode=mode))
    cli = LitTuneCLI(args=["fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--config", str(overrides)])
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/reward_mean")]
    steps_logged = [{k: float(v) for k, v in row.items() if v != ""} for row in rows]
    return cli.model, steps_logged


def _series(steps, name):
    return [step[name] for step in steps]


OVERRIDES = """\
trainer:
  max_steps: {steps}
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  callbacks: []
  default_root_dir: {out}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {out}
      name: csv
model:
  init_args:
    mode: {mode}
    export: false
"""


def test_tiny_config_reward_rises_sync(tmp_path):
    _, steps = _run_tiny_config(tmp_path, "sync")
    assert len(steps) == 30
    _assert_reward_rises(_series(steps, "train/reward_mean"))
    for name in (
        "train/loss",
        "train/reward_std",
        "train/rewards/numeric_match_mean",
        "train/rewards/numeric_match_std",
        "train/kl",
        "train/clip_fraction",
        "train/ratio_max",
        "train/completion_length",
        "train/policy_lag",
        "train/generation_tokens_per_sec",
        "train/tokens_per_sec",
    ):
        assert name in steps[-1], name
    # The reference is the initial policy, so the first step's KL is 0; the sync ratio is always 1.
    assert steps[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert max(_series(steps, "train/kl")) > 0
    assert set(_series(steps, "train/clip_fraction")) == {0.0}
    assert set(_series(steps, "train/policy_lag")) == {0.0}


def test_tiny_config_reward_rises_async(tmp_path):
    threads_before = threading.active_count()
    module, steps = _run_tiny_config(tmp_path, "async")
    assert len(steps) == 30
    _assert_reward_rises(_series(steps, "train/reward_mean"))
    assert max(_series(steps, "train/policy_lag")) <= 1  # max_staleness in the config
    assert "train/queue_depth" in steps[-1]
    assert "train/dropped_stale" in steps[-1]
    assert module.rollouts.process is None  # stopped when fit ended
    _assert_no_worker_left(threads_before)


class SlowStep(L.Callback):
    """Gives the worker time to fill the queue before the module publishes new weights."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.5)


def test_async_drops_rollouts_older_than_max_staleness():
    module = _module(mode="async", max_staleness=0, sync_every=1, queue_size=4)
    with pytest.warns(UserWarning, match="queue_size=4 is above max_staleness=0"):
        recorder = _fit(module, steps=4, callbacks=[SlowStep()], batch_size=2)
    assert set(recorder.series("train/policy_lag")) == {0.0}
    # After each step the queue contains rollouts of the previous version, which must be dropped.
    assert recorder.series("train/dropped_stale")[-1] >= 1
    assert module.rollouts.dropped_stale == recorder.series("train/dropped_stale")[-1]


_CALLS = {"count": 0}


def failing_reward(prompts, completions, **fields):
    """Fails on its third call, in the worker process."""
    _CALLS["count"] += 1
    if _CALLS["count"] == 3:
        raise ZeroDivisionError("reward failed on call 3")
    return [0.0] * len(completions)


def test_async_worker_error_stops_fit():
    threads_before = threading.active_count()
    module = _module(mode="async", rewards=[failing_reward], queue_size=1)
    with pytest.raises(ZeroDivisionError, match="reward failed on call 3") as error:
        _fit(module, steps=20, batch_size=2)
    assert "Traceback in the rollout worker" in str(error.value.__cause__)
    assert module.rollouts.process is None
    _assert_no_worker_left(threads_before)


class Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise KeyboardInterrupt


def test_async_interrupt_stops_worker():
    threads_before = threading.active_count()
    handler = signal.getsignal(signal.SIGINT)
    module = _module(mode="async")
    try:
        # Lightning handles the interrupt, stops the run, and exits with status 1.
        with pytest.raises(SystemExit):
            _fit(module, steps=20, callbacks=[Interrupt()], batch_size=2)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert module.rollouts.process is None
    _assert_no_worker_left(threads_before)


def odd_first_byte(prompts, completions, **fields):
    """A reward with spread from the first step, so that every step changes the weights."""
    return [float(ord(c[0]) % 2) if c else 0.0 for c in completions]


def test_sync_resume_matches_uninterrupted(tmp_path):
    # Same prompts (the loader's position is in the checkpoint), same samples (seeded by step),
    # and the same frozen reference (part of the checkpoint): the resumed run ends identical.
    settings = {"mode": "sync", "kl_coef": 0.05, "rewards": [odd_first_byte]}
    uninterrupted = _module(**settings)
    _fit(uninterrupted, steps=4, batch_size=2)

    first = _module(**settings)
    L.seed_everything(0)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(first, datamodule=_data(batch_size=2))
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = _module(**settings)
    L.seed_everything(1)  # the resumed run must not depend on the seed it starts with
    cpu_trainer(max_steps=4).fit(resumed, datamodule=_data(batch_size=2), ckpt_path=tmp_path / "step2.ckpt")

    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    # The policy moved away from the reference, so the comparison above is not trivial.
    moved = (uninterrupted.model.lm_head.weight - uninterrupted.ref_model.lm_head.weight).abs().max()
    assert moved > 1e-3


class PromptRecorder(L.Callback):
    """Record the prompt tokens (real tokens without a label) of every training batch."""

    def __init__(self):
        self.prompts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = zip(batch.input_ids, batch.labels, batch.attention_mask)
        self.prompts.append([ids[(labels == IGNORE_INDEX) & (mask == 1)].tolist() for ids, labels, mask in rows])


def test_async_resume_continues_prompt_order(tmp_path):
    # max_staleness is high so that no batch is dropped and both runs take the same prompts.
    settings = {"mode": "async", "max_staleness": 100, "queue_size": 1}
    straight = PromptRecorder()
    L.seed_everything(0)
    cpu_trainer(max_steps=6, callbacks=[straight]).fit(_module(**settings), datamodule=_data(batch_size=2))

    first = PromptRecorder()
    trainer = cpu_trainer(max_steps=3, callbacks=[first])
    trainer.fit(_module(**settings), datamodule=_data(batch_size=2))
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = PromptRecorder()
    cpu_trainer(max_steps=6, callbacks=[resumed]).fit(
        _module(**settings), datamodule=_data(batch_size=2), ckpt_path=tmp_path / "step3.ckpt"
    )

    assert len(straight.prompts) == 6
    assert first.prompts == straight.prompts[:3]
    assert resumed.prompts == straight.prompts[3:]


def _fixed_batch(module):
    """Two prompt + completion sequences of different lengths, right-padded."""
    input_ids = torch.tensor([[1, 40, 41, 42, 50, 51, 2, 0], [1, 43, 60, 61, 62, 63, 64, 2]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 4:7] = input_ids[0, 4:7]
    labels[1, 2:8] = input_ids[1, 2:8]
    attention_mask = torch.tensor([[1] * 7 + [0], [1] * 8])
    old_log_probs = torch.zeros(2, 8)
    old_log_probs[0, 3:6] = torch.tensor([-5.0, -5.5, -6.0])
    old_log_probs[1, 1:7] = torch.tensor([-5.8, -5.2, -6.1, -5.9, -5.0, -5.6])
    return RolloutBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        num_tokens=15,
        num_targets=9,
        old_log_probs=old_log_probs,
        advantages=torch.tensor([1.5, -0.5]),
    )


def _policy_log_probs(module, batch):
    logits = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_log_probs(logits, shift_labels(batch.labels))


def test_sync_loss_and_gradient_match_naive_policy_gradient():
    torch.manual_seed(0)
    module = _module(mode="sync")
    module.configure_model()
    batch = _fixed_batch(module)

    loss = module.normalise(module.compute_loss(batch))
    loss.backward()
    grad = module.model.lm_head.weight.grad.clone()
    module.model.zero_grad()

    # Ratio 1 on every token: loss = -sum_i A_i * sum_t logp_it / N with N = 9 completion tokens.
    log_probs = _policy_log_probs(module, batch)
    naive = -(batch.advantages[:, None] * log_probs).sum() / 9
    naive.backward()
    expected_value = -(1.5 * 3 - 0.5 * 6) / 9
    torch.testing.assert_close(loss.detach(), torch.tensor(expected_value), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, module.model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_async_loss_uses_sampling_log_probs():
    torch.manual_seed(0)
    module = _module(mode="async", clip_eps=0.2, loss_average="sequence")
    module.configure_model()
    batch = _fixed_batch(module)
    terms = module.compute_loss(batch)

    # Naive reference: clipped surrogate with ratios against the batch's old log-probabilities.
    with torch.no_grad():
        log_probs = _policy_log_probs(module, batch)
    mask = shift_labels(batch.labels) != IGNORE_INDEX
    expected = 0.0
    for i in range(2):
        ratios = (log_probs[i][mask[i]] - batch.old_log_probs[i][mask[i]]).exp()
        advantage = batch.advantages[i]
        surrogate = torch.minimum(ratios * advantage, ratios.clamp(0.8, 1.2) * advantage)
        expected += -surrogate.mean()
    torch.testing.assert_close(terms.loss_sum.detach(), expected, rtol=1e-5, atol=1e-6)
    assert terms.count.item() == 2


def test_invalid_arguments_are_listed_together():
    with pytest.raises(ValueError) as error:
        GRPOModule(
            model="tiny",
            group_size=0,
            max_new_tokens=0,
            temperature=0.0,
            mode="offline",
            max_staleness=1,
            sync_every=4,
        )
    message = str(error.value)
    for part in (
        "group_size=0",
        "max_new_tokens=0",
        "temperature=0.0",
        "mode='offline'",
        "max_staleness=1 is below sync_every - 1 = 3",
    ):
        assert part in message


def test_async_rejects_unpicklable_rewards():
    with pytest.raises(ValueError, match="module-level functions"):
        GRPOModule(
            model="tiny",
            mode="async",
            rewards=[lambda prompts, completions, **fields: [0.0] * len(completions)],
        )


def test_async_mode_needs_the_rollout_loader():
    module = _module(mode="async")
    with pytest.raises(RuntimeError, match="was not made by GRPOModule.rollout_loader"):
        module.training_step(PromptBatch(rows=[]), 0)


GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"

GSM8K_OVERRIDES = """\
model:
  init_args:
    model: tiny
    max_new_tokens: 8
    group_size: 2
    export: false
data:
  init_args:
    tokenizer: tiny
    max_rows: 8
    batch_size: 2
trainer:
  accelerator: cpu
  max_steps: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  callbacks: []
  default_root_dir: {out}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {out}
      name: csv
"""


@pytest.mark.acceptance
@pytest.mark.skipif(not GSM8K.is_dir(), reason="GSM8K data folder not found")
def test_gsm8k_config_trains_on_real_data(tmp_path, monkeypatch):
    # The config's data path is relative to the repository root. The tiny model replaces
    # the SFT export, and two short steps check that the config and the real data work together.
    monkeypatch.chdir(CONFIGS.parent)
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(GSM8K_OVERRIDES.format(out=tmp_path))
    cli = LitTuneCLI(args=["fit", "--config", str(CONFIGS / "grpo_gsm8k.yaml"), "--config", str(overrides)])
    assert cli.model.hparams.mode == "async"
    assert cli.model.rewards.names == ["numeric_match", "final_answer_format"]
    # The byte-level tiny tokenizer makes some GSM8K prompts longer than max_prompt_len.
    stats = cli.datamodule.stats
    assert stats.rows == 8
    assert len(cli.datamodule.train_prompts) == stats.kept == 8 - stats.dropped_too_long
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/reward_mean")]
    assert len(rows) == 2
    assert cli.model.rollouts.process is None
