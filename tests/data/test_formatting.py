"""Prompt masking, EOS handling and collation of SFT rows."""

import pytest
import torch

from lit_tune.data import ColumnMap, DataFormatError, FormatStats, Row, SFTDataModule, collate_rows
from lit_tune.data.formatting import build_example
from lit_tune.losses import IGNORE_INDEX, shift_labels

X = IGNORE_INDEX


def test_collate_pad_equals_eos_keeps_real_eos():
    # Prompt 5 6, answer 7 8, real EOS 2, then padding with pad id 2.
    input_ids, labels = build_example([5, 6], [7, 8, 2])
    batch = collate_rows([Row(input_ids, labels), Row([5, 6, 7, 8, 9, 10, 2], [X] * 7)], pad_id=2)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 2, 2, 2]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch.labels[0].tolist() == [X, X, 7, 8, 2, X, X]
    assert batch.num_targets == 3


def test_build_example_masks_position_zero_without_prompt_masking():
    input_ids, labels = build_example([5, 6], [7, 2], mask_prompt=False)
    assert input_ids == [5, 6, 7, 2]
    assert labels == [X, 6, 7, 2]


def _module(rows, **kwargs):
    kwargs.setdefault("val_fraction", 0.0)
    dm = SFTDataModule(rows=rows, **kwargs)
    dm.setup("fit")
    return dm


def test_tiny_tokenizer_trains_on_eos_with_pad_equal_eos():
    dm = SFTDataModule(rows=[{"prompt": "hi", "response": "yo"}], val_fraction=0.0)
    dm.tokenizer.pad_token = dm.tokenizer.eos_token
    dm.setup("fit")
    eos = dm.tokenizer.eos_token_id
    batch = collate_rows(dm.train_rows + [Row([1] * 40, [X] * 40)], pad_id=dm.tokenizer.pad_token_id)
    row_labels = batch.labels[0]
    trained = row_labels[row_labels != X].tolist()
    assert dm.tokenizer.decode(trained[:-1]) == "yo"
    assert trained[-1] == eos
    # The padding after the row (also id `eos`) is not trained.
    assert (shift_labels(batch.labels)[0] != X).sum().item() == 3


def test_single_bos_from_chat_template():
    dm = _module([{"prompt": "hi", "response": "yo"}])
    ids = dm.train_rows[0].input_ids
    assert ids.count(dm.tokenizer.bos_token_id) == 1
    assert ids[0] == dm.tokenizer.bos_token_id


@pytest.mark.parametrize(
    ("row", "columns"),
    [
        ({"prompt": "p", "response": "r"}, ColumnMap()),
        ({"question": "p", "answer": "r"}, ColumnMap()),
        ({"q": "p", "a": "r"}, ColumnMap(prompt="q", response="a")),
        ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}, ColumnMap()),
    ],
)
def test_column_mappings_give_same_tokens(row, columns):
    dm = _module([row], prompt_column=columns.prompt, response_column=columns.response)
    reference = _module([{"prompt": "p", "response": "r"}])
    assert dm.train_rows[0].input_ids == reference.train_rows[0].input_ids
    assert dm.train_rows[0].labels == reference.train_rows[0].labels


def test_missing_columns_error_lists_found_columns():
    with pytest.raises(DataFormatError, match=r"missing column.*found \['input', 'output'\]"):
        _module([{"input": "a", "output": "b"}])


def test_non_string_field_error_names_row_and_column():
    with pytest.raises(DataFormatError, match=r"row 2: column 'response' must be a string, got int"):
        _module([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}])


def test_unknown_role_error():
    messages = [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataFormatError, match=r"unknown role 'wizard'"):
        _module([{"messages": messages}])


def test_transcript_must_end_with_assistant():
    with pytest.raises(DataFormatError, match=r"last message has role 'user'"):
        _module([{"messages": [{"role": "user", "content": "a"}]}])


def test_empty_and_whitespace_responses_dropped_and_counted():
    dm = _module([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}, {"prompt": "a", "response": "  \n"}])
    assert len(dm.train_rows) == 1
    assert dm.last_stats.dropped_empty_response == 2


def test_overlong_rows_truncated_or_dropped_with_counts():
    rows = [{"prompt": "a", "response": "b" * 100}, {"prompt": "a" * 100, "response": "b"}, {"prompt": "a", "response": "b"}]
    dm = _module(rows, max_seq_len=32)
    assert [len(r.input_ids) for r in dm.train_rows] == [32, 9]
    assert dm.last_stats.truncated == 1
    assert dm.last_stats.dropped_too_long == 1
    # The truncated row keeps the start of its response and loses the EOS.
    assert dm.train_rows[0].input_ids[-1] != dm.tokenizer.eos_token_id

    dropped = _module(rows, max_seq_len=32, overlong="drop")
    assert len(dropped.train_rows) == 1
    assert dropped.last_stats.dropped_too_long == 2


def test_all_rows_dropped_is_an_error():
    with pytest.raises(DataFormatError, match="no training rows are left"):
        _module([{"prompt": "a", "response": " "}])


def test_format_stats_summary_mentions_counts():
    stats = FormatStats(rows=3, kept=1, truncated=1, dropped_empty_response=1, dropped_too_long=0)
    assert stats.summary() == "1/3 rows kept, 1 truncated, 1 dropped for an empty response, 0 dropped as too long"


def test_invalid_arguments_are_reported_together():
    with pytest.raises(ValueError, match=r"val_fraction=1.5.*batch_size=0"):
        SFTDataModule(val_fraction=1.5, batch_size=0)


def test_collated_batch_tensors_are_long():
    batch = collate_rows([Row([1, 2, 3], [X, 2, 3])], pad_id=0)
    assert batch.input_ids.dtype == torch.long
    assert batch.position_ids is None


def test_missing_column_in_file_row(tmp_path):
    # In a JSONL file, `datasets` fills a column that one row lacks with null.
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataFormatError, match=r"row 2: column 'response' is missing or null"):
        SFTDataModule(path=str(path), val_fraction=0.0, batch_size=1).setup("fit")


def test_row_error_gives_file_row_after_split(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = ['{"prompt": "a", "response": "b"}'] * 29 + ['{"prompt": "c"}']
    path.write_text("\n".join(lines) + "\n")
    # The bad row is the file's 30th, whichever split it falls in.
    with pytest.raises(DataFormatError, match=r"\((train|validation)\), row 30: column 'response' is missing"):
        SFTDataModule(path=str(path), val_fraction=0.2, batch_size=1).setup("fit")
