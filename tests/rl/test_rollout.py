"""Sampling completions, completion masks when pad equals EOS, scoring and collation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_tune.losses import IGNORE_INDEX, shift_labels, token_log_probs
from lit_tune.models.tiny import build_tiny_tokenizer
from lit_tune.rl.rewards import RewardSet
from lit_tune.rl.rollout import (
    Completions,
    GenerationConfig,
    PromptRow,
    collate_rollouts,
    completion_mask,
    lengths_to_mask,
    sample_completions,
    score_completions,
)

EOS = PAD = 2


def _small_model(vocab_size=4, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_completion_mask_pad_equals_eos():
    ids = torch.tensor([[11, 12, 2, 2, 2], [11, 2, 12, 2, 13], [11, 12, 13, 14, 15], [2, 2, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(completion_mask(ids, eos_token_id=2), expected)


def test_lengths_to_mask():
    assert torch.equal(lengths_to_mask(torch.tensor([3, 0, 5]), 5), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))


def test_collated_labels_stop_at_first_eos():
    # The generated-completion case: [11, 12, 2] was sampled, then two pads that equal EOS.
    completions = Completions(
        token_ids=torch.tensor([[11, 12, 2, 2, 2]]),
        log_probs=torch.tensor([[-0.1, -0.2, -0.3, 0.0, 0.0]]),
        lengths=torch.tensor([3]),
        seconds=1.0,
    )
    config = GenerationConfig(group_size=1, max_new_tokens=5, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    rows = [PromptRow(prompt_ids=[1, 5, 6], prompt="p", fields={"answer": "7"})]
    rewards = RewardSet([lambda prompts, completions, **f: [0.5] * len(completions)])
    rollouts = score_completions(rows, completions, build_tiny_tokenizer(), rewards, config)
    assert rollouts.completion_ids == [[11, 12, 2]]
    assert rollouts.truncated == [False]

    batch = collate_rollouts(rollouts, pad_token_id=PAD)
    assert batch.labels.tolist() == [[IGNORE_INDEX] * 3 + [11, 12, 2]]
    loss_mask = (shift_labels(batch.labels) != IGNORE_INDEX).long()
    assert loss_mask.tolist() == [[0, 0, 1, 1, 1, 0]]
    # Old log-probabilities sit where the logits that predict each completion token are.
    torch.testing.assert_close(batch.old_log_probs, torch.tensor([[0.0, 0.0, -0.1, -0.2, -0.3, 0.0]]))


def test_sampling_stops_at_eos_and_masks_the_rest():
    model = _small_model()
    config = GenerationConfig(group_size=8, max_new_tokens=12, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    generator = torch.Generator().manual_seed(0)
    completions = sample_completions(model, [[1, 3, 0], [3]], config, generator)

    assert completions.token_ids.shape[0] == 16
    assert completions.token_ids.shape[1] <= 12
    lengths = completions.lengths
    # With 4 tokens, some completions end early and some run to the limit.
    assert (lengths < completions.token_ids.shape[1]).any()
    width = completions.token_ids.shape[1]
    from_lengths = lengths_to_mask(lengths, width)
    assert torch.equal(from_lengths, completion_mask(completions.token_ids, EOS))
    for i, n in enumerate(lengths.tolist()):
        if n < width:
            assert completions.token_ids[i, n - 1] == EOS
        assert (completions.token_ids[i, n:] == PAD).all()
        assert (completions.log_probs[i, n:] == 0).all()
        assert (completions.log_probs[i, :n] < 0).all()


def test_sampling_respects_max_new_tokens():
    model = _small_model()
    config = GenerationConfig(group_size=2, max_new_tokens=3, temperature=1.0, eos_token_id=99, pad_token_id=0)
    completions = sample_completions(model, [[1, 2]], config, torch.Generator().manual_seed(0))
    assert completions.token_ids.shape == (2, 3)
    assert completions.lengths.tolist() == [3, 3]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_log_probs_match_a_training_forward(temperature):
    # Left-padded, cached sampling must score tokens as the right-padded training forward does,
    # or importance ratios would be off even for rollouts of the current policy.
    model = _small_model(vocab_size=64)
    config = GenerationConfig(group_size=3, max_new_tokens=6, temperature=temperature, eos_token_id=EOS, pad_token_id=0)
    prompts = [[1, 5, 9, 13, 40, 7], [1, 8], [1, 30, 31]]
    completions = sample_completions(model, prompts, config, torch.Generator().manual_seed(1))
    rows = [PromptRow(prompt_ids=p, prompt="p") for p in prompts]
    rewards = RewardSet([lambda prompts, completions, **f: [float(len(c)) for c in completions]])
    rollouts = score_completions(rows, completions, build_tiny_tokenizer(), rewards, config)
    batch = collate_rollouts(rollouts, pad_token_id=0)

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits / temperature
    targets = shift_labels(batch.labels)
    recomputed = token_log_probs(logits, targets)
    mask = targets != IGNORE_INDEX
    assert mask.sum() == sum(len(c) for c in rollouts.completion_ids)
    torch.testing.assert_close(recomputed[mask], batch.old_log_probs[mask], rtol=0, atol=1e-5)


def _answer_is_first(prompts, completions, answer, **fields):
    return [float(c[:1] == a) for c, a in zip(completions, answer)]


def test_score_completions_groups_and_fields():
    tokenizer = build_tiny_tokenizer()
    texts = ["7", "8", "7x", "9", "1", "1", "1", "1"]
    ids = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(len(i) for i in ids)
    token_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    completions = Completions(token_ids, -torch.ones(token_ids.shape), torch.tensor([len(i) for i in ids]), 0.5)
    config = GenerationConfig(group_size=4, max_new_tokens=8, temperature=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rows = [PromptRow([1, 10], "Say 7.", {"answer": "7"}), PromptRow([1, 11], "Say 2.", {"answer": "2"})]
    rollouts = score_completions(rows, completions, tokenizer, RewardSet([_answer_is_first]), config)

    assert rollouts.rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rollouts.reward_components == {"_answer_is_first": rollouts.rewards}
    # Group 1: mean 0.5, std 0.5; group 2 has no spread.
    assert rollouts.advantages == [1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    assert rollouts.prompt_ids == [[1, 10]] * 4 + [[1, 11]] * 4

    stats = collate_rollouts(rollouts, tokenizer.pad_token_id).stats
    assert stats["reward_mean"] == pytest.approx(0.25)
    assert stats["reward_std"] == pytest.approx(0.4330127, abs=1e-6)
    assert stats["zero_spread_groups"] == pytest.approx(0.5)
    assert stats["completion_length"] == pytest.approx(sum(len(i) for i in ids) / 8)
    assert stats["generation_tokens_per_sec"] == pytest.approx(sum(len(i) for i in ids) / 0.5)


def test_masked_filler_rows_carry_no_loss():
    tokenizer = build_tiny_tokenizer()
    completions = Completions(torch.tensor([[20, 2], [21, 2]]), -torch.ones(2, 2), torch.tensor([2, 2]), 0.1)
    config = GenerationConfig(group_size=2, max_new_tokens=2, temperature=1.0, eos_token_id=2, pad_token_id=0)
    rows = [PromptRow([1, 10], "p", {"answer": "1"}, masked=True)]
    rollouts = score_completions(rows, completions, tokenizer, RewardSet(["starts_with_number"]), config)
    batch = collate_rollouts(rollouts, 0)
    assert (batch.labels == IGNORE_INDEX).all()
    assert batch.num_targets == 0
