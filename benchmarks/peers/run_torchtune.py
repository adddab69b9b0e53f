"""Runner for torchtune's single-device full-finetune recipe (peer environment ``torchtune``).

The recipe class ``FullFinetuneRecipeSingleDevice`` from torchtune's ``recipes`` package runs with
a config built here, exactly as ``tune run full_finetune_single_device --config ...`` would run it:
torchtune's Llama 3.2 builder sized from the folder's ``config.json`` (its RoPE scaling is off at
``scale_factor=1``), ``FullModelHFCheckpointer`` reading ``model.safetensors``, the chunked cross
entropy of torchtune's configs, ``torch.optim.AdamW`` with ``fused=True`` as in torchtune's
full-finetune configs, fp32, no compile, no activation checkpointing, no optimizer in backward.

Three small components plug the benchmark in: a tokenizer adapter for the folder's
``tokenizer.json`` (torchtune 0.6.1 has no tokenizer class for an arbitrary local one), a dataset
that returns the shared sequences as ``tokens``/``labels``, and a metric logger that timestamps
every step (``log_every_n_steps=1``; the recipe logs right after each optimizer step).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RunSpec, StepClock, load_sequences, parse_spec, write_result  # noqa: E402

_CLOCK = StepClock()
_LOSSES: list[float] = []
_SPEC: RunSpec | None = None


class TokenizerAdapter:
    """The part of torchtune's tokenizer interface the recipe uses, over a ``tokenizer.json``."""

    def __init__(self, path: str, eos_id: int, pad_id: int, bos_id: int | None = None) -> None:
        self._tokenizer = Tokenizer.from_file(path)
        self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id
        self.max_seq_len = None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Tokenize ``text``, adding BOS and EOS as torchtune's tokenizers do."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int]) -> str:
        """Turn token ids back into text."""
        return self._tokenizer.decode(ids)


class SequenceDataset(torch.utils.data.Dataset):
    """The benchmark's fixed-length sequences, with labels equal to the tokens."""

    def __init__(self, tokenizer: TokenizerAdapter, packed: bool = False) -> None:
        self.packed = packed
        self.sequences = load_sequences(_SPEC)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self.sequences[index]
        return {"tokens": ids, "labels": list(ids)}


class TimingLogger:
    """torchtune metric logger that records the time and loss of every logged step."""

    def log(self, name: str, data, step: int) -> None:
        """Ignore single scalars; the recipe logs each step through :meth:`log_dict`."""

    def log_dict(self, payload: dict, step: int) -> None:
        """Timestamp the end of step ``step``."""
        _CLOCK.tick()
        _LOSSES.append(float(payload["loss"]))

    def log_config(self, config) -> None:
        """Ignore the config."""

    def close(self) -> None:
        """Nothing to flush."""


def _model_config(folder: Path) -> dict:
    hf = json.loads((folder / "config.json").read_text())
    rope = hf.get("rope_parameters") or {}
    return {
        "_component_": "torchtune.models.llama3_2._component_builders.llama3_2",
        "vocab_size": hf["vocab_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf["num_key_value_heads"],
        "embed_dim": hf["hidden_size"],
        "max_seq_len": hf["max_position_embeddings"],
        "intermediate_dim": hf["intermediate_size"],
        "norm_eps": hf["rms_norm_eps"],
        "rope_base": int(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "scale_factor": 1,
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
    }


def _recipe_config(spec: RunSpec) -> dict:
    folder = Path(spec.model_dir)
    hf = json.loads((folder / "config.json").read_text())
    eos = hf["eos_token_id"][0] if isinstance(hf["eos_token_id"], list) else hf["eos_token_id"]
    pad = hf.get("pad_token_id")
    output_dir = str(Path(spec.work_dir) / "torchtune")
    this = Path(__file__).stem
    return {
        "output_dir": output_dir,
        "model": _model_config(folder),
        "tokenizer": {
            "_component_": f"{this}.TokenizerAdapter",
            "path": str(folder / "tokenizer.json"),
            "eos_id": eos,
            "pad_id": eos if pad is None else pad,
            "bos_id": hf.get("bos_token_id"),
        },
        "dataset": {"_component_": f"{this}.SequenceDataset", "packed": False},
        "seed": spec.seed,
        "shuffle": False,
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(folder),
            "checkpoint_files": ["model.safetensors"],
            "recipe_checkpoint": None,
            "output_dir": output_dir,
            "model_type": "LLAMA3_2",
        },
        "resume_from_checkpoint": False,
        "batch_size": spec.batch_size,
        "epochs": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": spec.lr, "weight_decay": 0.0, "fused": True},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "max_steps_per_epoch": spec.steps,
        "gradient_accumulation_steps": 1,
        "optimizer_in_bwd": False,
        "clip_grad_norm": None,
        "compile": False,
        "device": "cpu",
        "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "dtype": "fp32",
        "metric_logger": {"_component_": f"{this}.TimingLogger"},
        "log_every_n_steps": 1,
        "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


def _load_recipe_class() -> type:
    """Load the recipe class from its file, as `tune run` does; `recipes` refuses package imports."""
    import torchtune

    path = Path(torchtune.__file__).parents[1] / "recipes" / "full_finetune_single_device.py"
    module_spec = importlib.util.spec_from_file_location("full_finetune_single_device", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.FullFinetuneRecipeSingleDevice


def main() -> None:
    """Run the recipe on the spec's model and sequences and write the timings."""
    global _SPEC
    _SPEC = spec = parse_spec(__doc__.splitlines()[0])
    # The config names this file's classes by module path, so make it importable under its name.
    sys.modules.setdefault(Path(__file__).stem, sys.modules[__name__])
    recipe_class = _load_recipe_class()
    cfg = OmegaConf.create(_recipe_config(spec))
    recipe = recipe_class(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    notes = {"optimizer": "AdamW", "fused": True, "loss": "CEWithChunkedOutputLoss"}
    write_result(spec, _CLOCK, _LOSSES, notes)


if __name__ == "__main__":
    main()
