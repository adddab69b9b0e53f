"""Data: sources, formatting with prompt masking, packing, batch loaders and data modules."""

from lit_tune.data.builtin import (
    arithmetic_rows,
    builtin_rows,
    copy_number_rows,
    fixed_answer_rows,
    preference_rows,
)
from lit_tune.data.collate import Row, TokenBatch, collate_rows, pack_rows
from lit_tune.data.formatting import (
    ColumnMap,
    FormatStats,
    build_example,
    encode_prompt,
    encode_response,
)
from lit_tune.data.loader import BatchLoader, ResumableBatchLoader
from lit_tune.data.preference import (
    PairColumns,
    PairEncoder,
    PreferenceBatch,
    PreferenceBatchLoader,
    PreferenceDataModule,
    PreferenceRow,
    ResumablePreferenceLoader,
    collate_pairs,
    gsm8k_solution_pairs,
    parse_transcript,
    row_to_pair,
    split_shared_prompt,
)
from lit_tune.data.prompts import PromptDataModule, PromptLoader
from lit_tune.data.sft import SFTDataModule, data_parallel_info
from lit_tune.data.sources import DataFormatError, load_rows

__all__ = [
    "BatchLoader",
    "ColumnMap",
    "DataFormatError",
    "FormatStats",
    "PairColumns",
    "PairEncoder",
    "PreferenceBatch",
    "PreferenceBatchLoader",
    "PreferenceDataModule",
    "PreferenceRow",
    "PromptDataModule",
    "PromptLoader",
    "ResumableBatchLoader",
    "ResumablePreferenceLoader",
    "Row",
    "SFTDataModule",
    "TokenBatch",
    "arithmetic_rows",
    "build_example",
    "builtin_rows",
    "collate_pairs",
    "collate_rows",
    "copy_number_rows",
    "data_parallel_info",
    "encode_prompt",
    "encode_response",
    "fixed_answer_rows",
    "gsm8k_solution_pairs",
    "load_rows",
    "pack_rows",
    "parse_transcript",
    "preference_rows",
    "row_to_pair",
    "split_shared_prompt",
]
