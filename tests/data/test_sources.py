"""Reading rows from files, with errors that name file and line."""

import gzip
import json

import pytest

from lit_tune.data import DataFormatError, SFTDataModule, load_rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_csv_parquet_and_gzip_load_the_same_rows(tmp_path):
    import datasets

    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write(jsonl.read_text())
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    for name in ["d.jsonl", "d.jsonl.gz", "d.csv", "d.parquet"]:
        loaded, _ = load_rows(str(tmp_path / name))
        assert loaded == rows, name


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl: could not be read as json: line 2: invalid JSON") as error:
        load_rows(str(path))
    assert "at column 29" in str(error.value)  # where the value is missing, not column 1 of a next line


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"empty.jsonl: the file is empty"):
        load_rows(str(path))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataFormatError, match=r"unsupported file type '.txt'"):
        load_rows(str(path))


def test_row_error_names_the_file(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "a", "answer": "b"}, {"question": "a", "answer": None}])
    dm = SFTDataModule(path=str(path), val_fraction=0.0)
    with pytest.raises(DataFormatError, match=r"rows.jsonl \(train\), row 2: column 'answer' is missing or null"):
        dm.setup("fit")


def test_validation_split_is_deterministic_and_disjoint():
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    a = SFTDataModule(rows=rows, val_fraction=0.25, seed=3)
    b = SFTDataModule(rows=rows, val_fraction=0.25, seed=3)
    a.setup("fit")
    b.setup("fit")
    assert len(a.val_rows) == 10
    assert [r.input_ids for r in a.val_rows] == [r.input_ids for r in b.val_rows]
    train = {tuple(r.input_ids) for r in a.train_rows}
    assert not train & {tuple(r.input_ids) for r in a.val_rows}
