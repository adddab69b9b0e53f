"""The generation worker process: shared weights, policy versions, failures and shutdown."""

import multiprocessing
import os
import signal

import pytest
import torch

from lit_tune.data.prompts import PromptDataModule, PromptLoader
from lit_tune.losses import IGNORE_INDEX, shift_labels, token_log_probs
from lit_tune.models.loading import load_model
from lit_tune.models.tiny import build_tiny_tokenizer
from lit_tune.rl.async_worker import AsyncRolloutLoader, SharedWeights, WorkerSpec, full_state_items
from lit_tune.rl.rewards import RewardSet
from lit_tune.rl.rollout import GenerationConfig


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return load_model("tiny", vocab_size=len(build_tiny_tokenizer())).eval()


def test_shared_weights_round_trip():
    source, target = _tiny_model(0), _tiny_model(1)
    shared = SharedWeights(full_state_items(source), multiprocessing.get_context("spawn"))
    assert len(shared.buffers) == 1  # one flat fp32 buffer for every tensor
    shared.publish(full_state_items(source), version=3)

    assert shared.load_into(target, known_version=-1) == 3
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name

    # A worker that already has version 3 does not copy again.
    shared.view("lm_head.weight").zero_()
    assert shared.load_into(target, known_version=3) == 3
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)


def _loader(model, version, **kwargs):
    tokenizer = build_tiny_tokenizer()
    data = PromptDataModule(rows=[{"prompt": f"Say {i}.", "answer": str(i)} for i in range(8)], use_chat_template=False)
    data.setup("fit")
    prompts = PromptLoader(data.train_prompts, batch_size=2, pad_id=tokenizer.pad_token_id, seed=0)
    generation = GenerationConfig(group_size=2, max_new_tokens=4, temperature=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    spec = WorkerSpec(model_config=model.config, tokenizer=tokenizer, rewards=RewardSet(["numeric_match"]), generation=generation)
    return AsyncRolloutLoader(
        prompts, spec, state=lambda: full_state_items(model), current_version=lambda: version["now"], pad_token_id=tokenizer.pad_token_id, **kwargs
    )


def _assert_log_probs_match(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = shift_labels(batch.labels)
    mask = targets != IGNORE_INDEX
    torch.testing.assert_close(token_log_probs(logits, targets)[mask], batch.old_log_probs[mask], rtol=0, atol=1e-4)


def test_worker_follows_published_weights():
    model = _tiny_model()
    version = {"now": 0}
    loader = _loader(model, version, max_staleness=100, queue_size=1)
    try:
        loader.start()
        first = loader.next_batch()
        assert first.policy_version == 0
        _assert_log_probs_match(model, first)  # the worker sampled with the trainer's weights

        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        version["now"] = 5
        loader.publish(5)
        batch = loader.next_batch()
        for _ in range(5):  # at most the queued batch and the one being generated are older
            if batch.policy_version == 5:
                break
            batch = loader.next_batch()
        assert batch.policy_version == 5
        assert batch.stats["policy_lag"] == 0
        _assert_log_probs_match(model, batch)
    finally:
        loader.close()
    assert loader.process is None
    assert multiprocessing.active_children() == []
    loader.close()  # closing twice is harmless


def test_killed_worker_is_reported():
    model = _tiny_model()
    loader = _loader(model, {"now": 0})
    loader.start()
    loader.next_batch()
    os.kill(loader.process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="exited with code -9 without reporting an error"):
        for _ in range(10):
            loader.next_batch()
    assert loader.process is None
    assert multiprocessing.active_children() == []


def _prompts_of(batch):
    # Prompt tokens are the real tokens that carry no label.
    rows = []
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask):
        rows.append(ids[(labels == IGNORE_INDEX) & (mask == 1)].tolist())
    return rows


def _take(loader, count):
    batches = iter(loader)
    return [_prompts_of(next(batches)) for _ in range(count)]


def test_resumed_loader_continues_prompt_order():
    model = _tiny_model()
    version = {"now": 0}
    straight = _loader(model, version, max_staleness=100)
    try:
        # 8 prompts in micro-batches of 2: 4 batches per epoch; the 5th opens the second epoch.
        expected = _take(straight, 4) + _take(straight, 1)
    finally:
        straight.close()

    interrupted = _loader(model, version, max_staleness=100)
    try:
        assert _take(interrupted, 2) == expected[:2]
        state = interrupted.state_dict()
    finally:
        interrupted.close()
    assert state["taken_in_epoch"] == 2

    resumed = _loader(model, version, max_staleness=100)
    resumed.load_state_dict(state)
    try:
        rest_of_epoch = [_prompts_of(batch) for batch in resumed]
        assert rest_of_epoch == expected[2:4]  # only the two batches left in the epoch
        assert _take(resumed, 1) == expected[4:5]
    finally:
        resumed.close()
    assert multiprocessing.active_children() == []
