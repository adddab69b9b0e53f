"""PromptDataModule: prompt columns, fields for rewards, filtering and the prompt loader."""

import json
from pathlib import Path

import pytest

from lit_tune.data.formatting import encode_prompt
from lit_tune.data.prompts import PromptDataModule, PromptLoader
from lit_tune.data.sources import DataFormatError
from lit_tune.rl.rewards import final_answer_format, numeric_match

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"


def _setup(**kwargs):
    data = PromptDataModule(**kwargs)
    data.setup("fit")
    return data


def test_question_answer_rows():
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5", "id": 4}]
    data = _setup(rows=rows)
    (prompt,) = data.train_prompts
    assert prompt.prompt == "What is 2 + 3?"
    assert prompt.fields == {"answer": "2 + 3 = 5\n#### 5", "id": 4}
    expected = encode_prompt(data.tokenizer, [{"role": "user", "content": "What is 2 + 3?"}])
    assert prompt.prompt_ids == expected
    assert data.tokenizer.decode(prompt.prompt_ids).endswith("<|assistant|>\n")


def test_messages_and_system_prompt():
    rows = [{"messages": [{"role": "user", "content": "Hi"}], "answer": "1"}]
    data = _setup(rows=rows, system_prompt="End with #### <number>.")
    text = data.tokenizer.decode(data.train_prompts[0].prompt_ids)
    assert text.startswith("<s><|system|>\nEnd with #### <number>.\n<|user|>\nHi\n")


def test_explicit_prompt_column_and_missing_column():
    data = _setup(rows=[{"task": "Say 3.", "answer": "3"}], prompt_column="task")
    assert data.train_prompts[0].fields == {"answer": "3"}
    with pytest.raises(DataFormatError, match=r"in-memory rows, row 1: no prompt column .*found \['answer', 'text'\]"):
        _setup(rows=[{"text": "Say 3.", "answer": "3"}])


def test_malformed_messages_name_the_row():
    rows = [{"prompt": "ok"}, {"prompt": [{"role": "robot", "content": "x"}]}]
    with pytest.raises(DataFormatError, match="row 2: message 0 of column 'prompt'"):
        _setup(rows=rows)


def test_long_prompts_are_dropped_and_counted():
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": "x" * 200, "answer": "2"}]
    data = _setup(rows=rows, max_prompt_len=40)
    assert [p.prompt for p in data.train_prompts] == ["short"]
    assert data.stats.dropped_too_long == 1
    with pytest.raises(DataFormatError, match="no prompt is left"):
        _setup(rows=rows[1:], max_prompt_len=40)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_prompt_len=0 must be at least 1. batch_size=0 must be at least 1."):
        PromptDataModule(max_prompt_len=0, batch_size=0)


def test_loader_splits_ranks_and_masks_fillers():
    data = _setup(rows=[{"prompt": f"Say {i}.", "answer": str(i)} for i in range(5)])
    ranks = [PromptLoader(data.train_prompts, 2, 0, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    batches = [list(loader) for loader in ranks]
    assert [len(b) for b in batches] == [2, 2]
    seen = [row for rank in batches for batch in rank for row in batch.rows]
    real = sorted(row.prompt for row in seen if not row.masked)
    assert real == [f"Say {i}." for i in range(5)]
    assert sum(row.masked for row in seen) == 3


def test_builtin_fixed_answer_default():
    data = _setup()
    assert len(data.train_prompts) == 256
    assert {p.fields["answer"] for p in data.train_prompts} == {"7"}


@pytest.mark.acceptance
@pytest.mark.skipif(not GSM8K.is_dir(), reason="GSM8K data folder not found")
def test_gsm8k_prompts_and_reference_rewards(tmp_path):
    # A slice of the real file keeps the test short; the reference solutions must score 1.
    lines = (GSM8K / "train.jsonl").read_text().splitlines()[:300]
    subset = tmp_path / "train.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    data = _setup(path=str(subset), max_prompt_len=1024)
    assert len(data.train_prompts) == 300
    references = [p.fields["answer"] for p in data.train_prompts]
    questions = [p.prompt for p in data.train_prompts]
    assert questions[0] == json.loads(lines[0])["question"]
    assert numeric_match(questions, references, answer=references) == [1.0] * 300
    assert final_answer_format(questions, references) == [1.0] * 300


def test_max_rows_keeps_the_first_rows():
    data = _setup(rows=[{"prompt": f"Say {i}.", "answer": str(i)} for i in range(10)], max_rows=3)
    assert [p.prompt for p in data.train_prompts] == ["Say 0.", "Say 1.", "Say 2."]
    with pytest.raises(ValueError, match="max_rows=0 must be at least 1"):
        PromptDataModule(max_rows=0)
