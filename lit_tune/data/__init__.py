"""Data: sources, formatting with prompt masking, packing, batch loaders and data modules."""

from lit_tune.data.builtin import arithmetic_rows, builtin_rows, copy_number_rows, preference_rows
from lit_tune.data.collate import Row, TokenBatch, collate_rows, pack_rows
from lit_tune.data.formatting import ColumnMap, FormatStats, build_example, encode_prompt, encode_response
from lit_tune.data.loader import BatchLoader, ResumableBatchLoader
from lit_tune.data.sft import SFTDataModule, data_parallel_info
from lit_tune.data.sources import DataFormatError, load_rows

__all__ = [
    "BatchLoader",
    "ColumnMap",
    "DataFormatError",
    "FormatStats",
    "ResumableBatchLoader",
    "Row",
    "SFTDataModule",
    "TokenBatch",
    "arithmetic_rows",
    "build_example",
    "builtin_rows",
    "collate_rows",
    "copy_number_rows",
    "data_parallel_info",
    "encode_prompt",
    "encode_response",
    "load_rows",
    "pack_rows",
    "preference_rows",
]
