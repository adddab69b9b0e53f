"""Read rows from local files (JSONL/JSON/CSV/Parquet, optionally gzipped), the hub, or memory."""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_tune.data.builtin import BUILTIN_PREFIX, builtin_rows

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataFormatError(ValueError):
    """A data file or row that cannot be used, with the file and line or row that caused it."""


def _file_format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DataFormatError(
            f"{path}: unsupported file type {''.join(path.suffixes)!r}. "
            "Use .jsonl, .json, .csv or .parquet (optionally .gz)."
        )
    return fmt


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _find_json_error(path: Path) -> str | None:
    """Return ``"line N: problem"`` for the first line of a JSONL file that is not a JSON object."""
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                # Without the newline, an error at the end of the line reports this line's column.
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return f"line {line_number}: invalid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"line {line_number}: expected a JSON object, got {type(value).__name__}"
    return None


def _load_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    fmt = _file_format(path)
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: the file is empty.")
    import datasets  # imported here: it adds about 65 MB of resident memory to every process

    try:
        dataset = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several exception types
        where = _find_json_error(path) if fmt == "json" else None
        detail = where or f"{type(err).__name__}: {err}"
        raise DataFormatError(f"{path}: could not be read as {fmt}: {detail}") from err
    if len(dataset) == 0:
        raise DataFormatError(f"{path}: the file contains no rows.")
    return dataset.to_list()


def load_rows(
    source: str | Sequence[Mapping[str, Any]], *, split: str = "train"
) -> tuple[list[dict[str, Any]], str]:
    """Load rows as a list of dicts.

    Args:
        source: In-memory rows, ``"builtin:<name>"``, a local file, or a hub dataset name.
        split: Split to read from a hub dataset.

    Returns:
        The rows, and a short description of where they came from, used in error messages.

    Raises:
        FileNotFoundError: A local path that does not exist.
        DataFormatError: An unreadable or empty file.
    """
    if not isinstance(source, str):
        rows = [dict(row) for row in source]
        if not rows:
            raise DataFormatError("The in-memory data contains no rows.")
        return rows, "in-memory rows"
    if source.startswith(BUILTIN_PREFIX):
        return builtin_rows(source), source
    path = Path(source).expanduser()
    if path.exists() or path.suffix in {".gz", *_FORMATS} or source.startswith((".", "/", "~")):
        return _load_file(path), str(path)
    import datasets

    log.info("Loading data set %r split %r from the hub.", source, split)
    return datasets.load_dataset(source, split=split).to_list(), f"{source} ({split})"


NumberedRows = list[tuple[int, dict[str, Any]]]


def split_train_val(rows: list[dict[str, Any]], val_fraction: float, seed: int) -> tuple[NumberedRows, NumberedRows]:
    """Split rows at random into training and validation, keeping file order within each.

    Each row comes with its 1-based position in ``rows``, so that error messages name the row of
    the file rather than its position in a split.

    Args:
        rows: The loaded rows.
        val_fraction: Share of the rows, rounded down, that goes to validation.
        seed: Seed of the split.

    Returns:
        ``(train, val)`` lists of ``(row number, row)`` pairs.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_val = int(len(rows) * val_fraction)
    val = [(i + 1, rows[i]) for i in sorted(order[:num_val])]
    train = [(i + 1, rows[i]) for i in sorted(order[num_val:])]
    return train, val


__all__ = ["DataFormatError", "NumberedRows", "load_rows", "split_train_val"]
