"""Packed documents are isolated: positions restart and each document's loss is its loss alone."""

import pytest
import torch

from lit_tune.data import Row, TokenBatch, collate_rows, pack_rows
from lit_tune.data.formatting import build_example
from lit_tune.losses import shift_labels, token_cross_entropy
from lit_tune.models import build_tiny_tokenizer, load_model
from lit_tune.modules import SFTModule


def _doc(length, start):
    ids = list(range(start, start + length))
    return Row(*build_example(ids[:1], ids[1:], mask_prompt=False))


def test_positions_restart_per_document():
    packed = pack_rows([_doc(3, 10), _doc(5, 20)], max_seq_len=8)
    assert len(packed) == 1
    assert packed[0].position_ids == [0, 1, 2, 0, 1, 2, 3, 4]
    batch = collate_rows(packed, pad_id=0)
    assert batch.attention_mask is None
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def test_pack_respects_max_len_and_rejects_long_rows():
    packed = pack_rows([_doc(3, 10), _doc(5, 20), _doc(4, 30)], max_seq_len=8)
    assert [len(r.input_ids) for r in packed] == [8, 4]
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_rows([_doc(9, 10)], max_seq_len=8)


def _per_document_losses(model, rows, lengths):
    batch = collate_rows(rows, pad_id=0)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    losses = token_cross_entropy(logits, shift_labels(batch.labels))[0]
    out, start = [], 0
    for length in lengths:
        out.append(losses[start : start + length].sum())
        start += length
    return out, logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_loss_and_logits_equal_alone(attn):
    torch.manual_seed(0)
    model = load_model("tiny", vocab_size=len(build_tiny_tokenizer()), attn_implementation=attn).eval()
    a, b = _doc(3, 10), _doc(5, 20)
    with torch.no_grad():
        (alone_a,), logits_a = _per_document_losses(model, [a], [3])
        (alone_b,), logits_b = _per_document_losses(model, [b], [5])
        (packed_a, packed_b), packed_logits = _per_document_losses(model, pack_rows([a, b], 8), [3, 5])
        (swapped_b, swapped_a), _ = _per_document_losses(model, pack_rows([b, a], 8), [5, 3])
    torch.testing.assert_close(packed_a, alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_b, alone_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped_a, alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped_b, alone_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_logits[:3], logits_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_logits[3:], logits_b, atol=1e-5, rtol=0)


def test_packing_rejects_attention_that_cannot_isolate():
    module = SFTModule(model="tiny", attn_implementation="flash_attention_2_custom_kernel")
    batch = TokenBatch(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long), position_ids=torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="cannot keep packed documents apart"):
        module.forward_logits(batch)
