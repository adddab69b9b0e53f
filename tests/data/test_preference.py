"""Preference data: row formats, transcript parsing, masking, truncation, counts and loaders."""

import gzip
import json
from pathlib import Path

import pytest

from lit_tune.data.formatting import FormatStats, encode_prompt, encode_response
from lit_tune.data.preference import (
    DROPPED_IDENTICAL,
    DROPPED_IDENTICAL_AFTER_TRUNCATION,
    DROPPED_NO_SHARED_PROMPT,
    PROMPTS_TRUNCATED,
    PairColumns,
    PairEncoder,
    PreferenceDataModule,
    PreferenceRow,
    ResumablePreferenceLoader,
    collate_pairs,
    gsm8k_solution_pairs,
    parse_transcript,
    row_to_pair,
    split_shared_prompt,
)
from lit_tune.data.sources import DataFormatError
from lit_tune.losses import IGNORE_INDEX
from lit_tune.models.tiny import build_tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _module(rows, **kwargs):
    kwargs.setdefault("val_fraction", 0.0)
    data = PreferenceDataModule(rows=rows, **kwargs)
    data.setup("fit")
    return data


def _prompt_length(text):
    return len(encode_prompt(build_tiny_tokenizer(), [{"role": "user", "content": text}]))


def _stats(data):
    (stats,) = data.stats.values()
    return stats


# ----------------------------------------------------------------- transcripts


def test_transcript_parses_turns():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Bye!"
    assert parse_transcript(text, "row 1") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye!"},
    ]


def test_transcript_keeps_repeated_marker_as_text():
    # Two Assistant markers in a row stay one turn, marker included, so no text is lost.
    text = "Human: Key?\n\nAssistant: Here:\n\nAssistant:  done"
    messages = parse_transcript(text, "row 1")
    assert messages == [
        {"role": "user", "content": "Key?"},
        {"role": "assistant", "content": "Here:\n\nAssistant:  done"},
    ]


def test_transcript_without_marker_is_an_error():
    with pytest.raises(DataFormatError, match="row 3.*transcript"):
        parse_transcript("Just some text\n\nAssistant: hi", "row 3")


def test_shared_prompt_is_common_prefix():
    prompt = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    chosen = [*prompt, {"role": "assistant", "content": "good"}]
    rejected = [*prompt, {"role": "assistant", "content": "bad"}]
    assert split_shared_prompt(chosen, rejected) == (prompt, "good", "bad")


def test_shared_prompt_missing_when_earlier_turn_differs():
    chosen = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rejected = [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "a"}]
    assert split_shared_prompt(chosen, rejected) is None
    longer = [*chosen, {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}]
    assert split_shared_prompt(longer, chosen) is None
    ends_with_user = [{"role": "user", "content": "q"}, {"role": "user", "content": "x"}]
    assert (
        split_shared_prompt(
            ends_with_user, [{"role": "user", "content": "q"}, {"role": "user", "content": "y"}]
        )
        is None
    )


# ----------------------------------------------------------------- row formats


def test_row_formats_give_same_pair():
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {
            "chosen": [*prompt, {"role": "assistant", "content": "4"}],
            "rejected": [*prompt, {"role": "assistant", "content": "5"}],
        },
        {
            "chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5",
        },
    ]
    for index, row in enumerate(rows):
        assert row_to_pair(row, PairColumns(), f"row {index}") == (prompt, "4", "5"), index


def test_row_format_errors_name_the_row():
    with pytest.raises(DataFormatError, match="row 7: missing column"):
        row_to_pair({"prompt": "q", "chosen": "a"}, PairColumns(), "row 7")
    with pytest.raises(DataFormatError, match="gsm8k_solutions"):
        row_to_pair({"question": "q", "ground_truth": "a"}, PairColumns(), "row 1")
    with pytest.raises(DataFormatError, match="one assistant message"):
        row_to_pair(
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            PairColumns(),
            "row 1",
        )
    with pytest.raises(DataFormatError, match="unknown|role"):
        row_to_pair(
            {
                "chosen": [{"role": "bot", "content": "a"}],
                "rejected": [{"role": "bot", "content": "b"}],
            },
            PairColumns(),
            "row 1",
        )


def test_custom_columns():
    pair = row_to_pair(
        {"q": "hi", "good": "yes", "bad": "no"}, PairColumns("q", "good", "bad"), "row 1"
    )
    assert pair == ([{"role": "user", "content": "hi"}], "yes", "no")


# ----------------------------------------------------------------- tokenization


def test_prompt_tokenized_once_with_one_bos(tokenizer):
    data = _module([{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    (row,) = data.train_rows
    prompt = [{"role": "user", "content": "hi"}]
    # The tiny chat template starts with <s>; the prompt still has exactly one.
    assert tokenizer.apply_chat_template(prompt, tokenize=False).startswith(tokenizer.bos_token)
    assert row.prompt_ids == encode_prompt(tokenizer, prompt)
    assert row.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert row.prompt_ids[0] == tokenizer.bos_token_id
    assert row.chosen_ids == encode_response(tokenizer, prompt, "yes")
    assert row.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row.rejected_ids) == "no</s>"


def test_batch_masks_prompt_and_padding(tokenizer):
    data = _module(
        [
            {"prompt": "hi", "chosen": "a long answer", "rejected": "no"},
            {"prompt": "longer prompt", "chosen": "b", "rejected": "c"},
        ]
    )
    rows = data.train_rows
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 4
    assert batch.batch_pairs == 2
    assert batch.pair_mask.tolist() == [True, True]
    sequences = [
        (rows[0], rows[0].chosen_ids),
        (rows[1], rows[1].chosen_ids),
        (rows[0], rows[0].rejected_ids),
        (rows[1], rows[1].rejected_ids),
    ]
    for i, (row, response) in enumerate(sequences):
        length = len(row.prompt_ids) + len(response)
        labels = batch.labels[i].tolist()
        # Chosen sequences first, then rejected ones, with the same prompt ids.
        assert batch.input_ids[i, : len(row.prompt_ids)].tolist() == row.prompt_ids
        assert labels[: len(row.prompt_ids)] == [IGNORE_INDEX] * len(row.prompt_ids)
        assert labels[len(row.prompt_ids) : length] == response
        assert labels[length:] == [IGNORE_INDEX] * (len(labels) - length)
        assert batch.attention_mask[i].tolist() == [1] * length + [0] * (len(labels) - length)
    assert batch.num_targets == sum(len(r.chosen_ids) + len(r.rejected_ids) for r in rows)


def test_filler_pair_has_no_targets(tokenizer):
    row = PreferenceRow([1, 5], [7, 2], [8, 2])
    filler = PreferenceRow([1, 5], [7, 2], [8, 2], is_filler=True)
    batch = collate_pairs([row, filler], tokenizer.pad_token_id)
    assert batch.pair_mask.tolist() == [True, False]
    assert batch.num_pairs == 1
    assert set(batch.labels[1].tolist()) == {IGNORE_INDEX}
    assert set(batch.labels[3].tolist()) == {IGNORE_INDEX}


def test_truncation_keeps_response_start_and_counts(tokenizer):
    rows = [
        {"prompt": "p", "chosen": "abcdefghij", "rejected": "ABCDEFGHIJKLMNOP"},
        {"prompt": "p", "chosen": "x", "rejected": "y"},
    ]
    data = _module(rows, max_seq_len=16)
    first = data.train_rows[0]
    room = 16 - len(first.prompt_ids)
    full_chosen = encode_response(tokenizer, [{"role": "user", "content": "p"}], "abcdefghij")
    assert first.chosen_ids == full_chosen[:room]
    assert tokenizer.decode(first.rejected_ids) == "ABCDEFGHIJKLMNOP"[:room]
    assert _stats(data).truncated == 1
    assert _stats(data).kept == 2


def test_overlong_drop_and_prompt_without_room():
    rows = [
        {"prompt": "p", "chosen": "abcdefghij" * 3, "rejected": "x"},
        {"prompt": "p" * 40, "chosen": "x", "rejected": "y"},
        {"prompt": "p", "chosen": "x", "rejected": "y"},
    ]
    data = _module(rows, max_seq_len=24, overlong="drop")
    assert _stats(data).dropped_too_long == 2
    assert len(data.train_rows) == 1


def test_max_prompt_len_keeps_end_and_bos(tokenizer):
    data = _module(
        [{"prompt": "0123456789" * 3, "chosen": "x", "rejected": "y"}],
        max_seq_len=64,
        max_prompt_len=12,
    )
    full = encode_prompt(tokenizer, [{"role": "user", "content": "0123456789" * 3}])
    (row,) = data.train_rows
    assert row.prompt_ids == [tokenizer.bos_token_id, *full[-11:]]
    assert _stats(data).extra[PROMPTS_TRUNCATED] == 1


def test_identical_and_empty_pairs_dropped_and_counted():
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {
            "prompt": "p",
            "chosen": "abcdef-1",
            "rejected": "abcdef-2",
        },  # identical once cut to 5 tokens
        {"prompt": "p", "chosen": "  ", "rejected": "x"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
    ]
    data = _module(rows, max_seq_len=_prompt_length("p") + 5)
    stats = _stats(data)
    assert stats.extra[DROPPED_IDENTICAL] == 1
    assert stats.extra[DROPPED_IDENTICAL_AFTER_TRUNCATION] == 1
    assert stats.extra[DROPPED_NO_SHARED_PROMPT] == 1
    assert stats.dropped_empty_response == 1
    assert stats.kept == 1
    assert "dropped as chosen == rejected" in stats.summary()


def test_system_prompt_added(tokenizer):
    data = _module([{"prompt": "hi", "chosen": "a", "rejected": "b"}], system_prompt="Be brief.")
    expected = encode_prompt(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert data.train_rows[0].prompt_ids == expected


def test_encoder_counts_without_data_module(tokenizer):
    encoder = PairEncoder(tokenizer, max_seq_len=64)
    stats = FormatStats()
    assert encoder.encode([{"role": "user", "content": "q"}], "a", "a", stats) is None
    assert stats.extra == {DROPPED_IDENTICAL: 1}


def test_invalid_arguments_listed_together():
    with pytest.raises(ValueError, match="val_fraction=1.5.*batch_size=0"):
        PreferenceDataModule(rows=[], val_fraction=1.5, batch_size=0)


# ----------------------------------------------------------------- GSM8K solutions


def _gsm8k_row(question, correct_flags):
    row = {"question": question, "ground_truth": f"truth of {question}\nA: 1"}
    for index, correct in enumerate(correct_flags):
        row[f"model_{index}"] = {
            "solution": f"solution {index} of {question}\nA: {index}",
            "is_correct": correct,
        }
    return row


def test_gsm8k_pairs_ground_truth_over_incorrect():
    rows = [
        _gsm8k_row("q1", [True, False, False]),
        _gsm8k_row("q2", [True]),
        _gsm8k_row("q3", [False]),
    ]
    pairs, without_incorrect = gsm8k_solution_pairs(rows)
    assert without_incorrect == 1
    assert pairs == [
        {"prompt": "q1", "chosen": "truth of q1\nA: 1", "rejected": "solution 1 of q1\nA: 1"},
        {"prompt": "q3", "chosen": "truth of q3\nA: 1", "rejected": "solution 0 of q3\nA: 0"},
    ]
    all_pairs, _ = gsm8k_solution_pairs(rows, max_pairs_per_question=None)
    assert [p["rejected"].split("\n")[0] for p in all_pairs] == [
        "solution 1 of q1",
        "solution 2 of q1",
        "solution 0 of q3",
    ]


def test_gsm8k_malformed_rows():
    with pytest.raises(DataFormatError, match="row 1.*ground_truth"):
        gsm8k_solution_pairs([{"question": "q"}])
    with pytest.raises(DataFormatError, match="row 1.*'m'.*is_correct"):
        gsm8k_solution_pairs([{"question": "q", "ground_truth": "a", "m": {"solution": "s"}}])


def test_gsm8k_rows_through_data_module(tmp_path):
    path = tmp_path / "solutions.jsonl"
    path.write_text("\n".join(json.dumps(_gsm8k_row(f"q{i}", [False, True])) for i in range(4)))
    data = PreferenceDataModule(path=str(path), row_format="gsm8k_solutions", val_fraction=0.25)
    data.setup("fit")
    assert (len(data.train_rows), len(data.val_rows)) == (3, 1)


# ----------------------------------------------------------------- loaders


def test_training_loader_counts_pairs_per_step():
    rows = [PreferenceRow([1, 5], [7 + i, 2], [8 + i, 2]) for i in range(5)]
    # Global batch of 2 ranks x 1 pair, accumulation 2: steps of 4 pairs, then 1 real pair + filler.
    windows, masks = [], []
    for rank in (0, 1):
        loader = ResumablePreferenceLoader(
            rows, 1, 0, shuffle=False, accumulate_grad_batches=2, num_replicas=2, rank=rank
        )
        batches = list(loader)
        windows.append([b.window_pairs for b in batches])
        masks.append([b.pair_mask.tolist() for b in batches])
    assert windows == [[4, 4, 1], [4, 4, 1]]
    assert masks == [[[True], [True], [True]], [[True], [True], [False]]]


def test_data_module_loaders(tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)]
    data = _module(rows, val_fraction=0.34, batch_size=2)
    assert (len(data.train_rows), len(data.val_rows)) == (4, 2)
    train = list(data.train_dataloader())
    assert [b.window_pairs for b in train] == [2, 2]
    (val,) = list(data.val_dataloader())
    assert val.window_pairs == 0
    assert val.num_pairs == 2


# ----------------------------------------------------------------- real data


@pytest.mark.acceptance
@pytest.mark.skipif(
    not (SHARED_DATA / "hh-rlhf").is_dir(), reason="shared hh-rlhf data not present"
)
def test_hh_rlhf_transcripts_lose_no_row_silently():
    path = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(300), handle)]
    data = _module(rows, max_seq_len=4096)
    stats = _stats(data)
    dropped = stats.dropped_empty_response + stats.dropped_too_long + sum(stats.extra.values())
    assert stats.rows == 300
    assert stats.kept + dropped == 300
    assert stats.kept >= 290
    for row in data.train_rows:
        assert row.chosen_ids != row.rejected_ids


@pytest.mark.acceptance
@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="shared GSM8K data not present")
def test_gsm8k_model_solutions_file():
    path = SHARED_DATA / "gsm8k" / "example_model_solutions.jsonl"
    data = PreferenceDataModule(
        path=str(path),
        row_format="gsm8k_solutions",
        max_rows=200,
        val_fraction=0.0,
        max_seq_len=1024,
    )
    data.setup("fit")
    stats = _stats(data)
    assert stats.rows > 150
    assert stats.kept + stats.dropped_too_long + sum(stats.extra.values()) == stats.rows
