"""Pieces of the side-by-side harness that run without the peer environments."""

from __future__ import annotations

import json

import pytest

from lit_tune.models import build_tiny_tokenizer
from tests.benchmarks._scripts import load_script

harness = load_script("peers/harness.py")
prepare = load_script("peers/prepare.py")


def test_sequences_have_exact_length_and_keep_order(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    tokenizer = build_tiny_tokenizer()

    sequences = prepare.build_sequences(tokenizer, str(data), seq_len=64, num_sequences=5)

    assert len(sequences) == 5
    assert all(len(sequence) == 64 for sequence in sequences)
    text = tokenizer.decode(sum(sequences, []))
    assert text.index("What is 0 + 0?") < text.index("What is 1 + 1?")


def test_too_little_data_is_an_error(tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}))
    with pytest.raises(ValueError, match="tokens; 6400 are needed"):
        prepare.build_sequences(build_tiny_tokenizer(), str(data), seq_len=64, num_sequences=100)


def test_summary_takes_medians_and_ratios():
    def record(system, speed, peak, round_index):
        return harness.RunRecord(system, "tiny", round_index, speed, peak, 1.0, first_loss=5.0)

    records = [
        record("lit_tune", 100.0, 500.0, 0),
        record("lit_tune", 120.0, 520.0, 1),
        record("lit_tune", 110.0, 510.0, 2),
        record("litgpt", 90.0, 400.0, 0),
        record("litgpt", 99.0, 410.0, 1),
        harness.RunRecord("litgpt", "tiny", 2, None, 300.0, 1.0, error="exit code 1"),
    ]
    rows = harness.summarize(records, ["lit_tune", "litgpt"], ["tiny"])

    lit_tune, litgpt = rows
    assert lit_tune["tokens_per_sec"] == 110.0
    assert (lit_tune["tokens_per_sec_min"], lit_tune["tokens_per_sec_max"]) == (100.0, 120.0)
    assert lit_tune["peak_rss_mib"] == 510.0
    assert litgpt["runs"] == 2  # the failed run is left out
    assert litgpt["tokens_per_sec"] == pytest.approx(94.5)
    assert litgpt["speed_vs_lit_tune"] == pytest.approx(94.5 / 110.0)
    assert litgpt["memory_vs_lit_tune"] == pytest.approx(405.0 / 510.0)
    table = harness.markdown_table(rows)
    assert "| tiny | litgpt | 94 | 90–99 | 0.86× | 405 | 0.79× | 5.0000 |" in table


def test_per_model_option_reads_defaults_and_overrides():
    assert harness._per_model("--steps", ["30", "smollm2=6"], ["tiny", "smollm2"]) == {"tiny": 30, "smollm2": 6}
    with pytest.raises(SystemExit, match="no value for"):
        harness._per_model("--steps", ["tiny=3"], ["tiny", "smollm2"])
