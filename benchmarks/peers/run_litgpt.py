"""Runner for litgpt's full finetuning, ``litgpt.finetune.full.setup`` (peer environment ``litgpt``).

The Hugging Face folder is first converted into a litgpt checkpoint (``lit_model.pth`` and
``model_config.yaml``) with litgpt's own Llama weight mapping, in a separate call
(``--convert``), so the conversion counts towards neither step time nor peak memory of the run.
The run then calls ``setup`` with a small ``DataModule`` serving the shared sequences, fp32
(``32-true``), micro batch equal to global batch, AdamW with the spec's settings, no gradient
clipping, and no evaluation beyond litgpt's fixed two-batch check before training. litgpt's
scheduler divides by the warm-up length, so warm-up is 1 step (the first step has learning rate
0, which does not change its cost). litgpt's ``GPT`` has no tied output head, so a tied model
such as SmolLM2 trains with an untied copy of the embedding.

Steps are timestamped by a Fabric logger that replaces litgpt's CSV logger; litgpt logs after
every optimizer step with ``log_interval=1``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from lightning.fabric.loggers import Logger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RunSpec, StepClock, load_sequences, parse_spec, write_result  # noqa: E402

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def litgpt_config(folder: Path):
    """Build the litgpt ``Config`` of a Hugging Face Llama folder."""
    from litgpt import Config

    hf = json.loads((folder / "config.json").read_text())
    rope = hf.get("rope_parameters") or {}
    return Config(
        name=folder.parent.name,
        block_size=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_query_groups=hf["num_key_value_heads"],
        n_embd=hf["hidden_size"],
        head_size=hf["hidden_size"] // hf["num_attention_heads"],
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=hf["rms_norm_eps"],
        mlp_class_name="LLaMAMLP",
        intermediate_size=hf["intermediate_size"],
        rope_base=int(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
    )


def convert(model_dir: Path, checkpoint_dir: Path) -> None:
    """Write a litgpt checkpoint of the Hugging Face folder ``model_dir`` into ``checkpoint_dir``."""
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
    from litgpt.utils import save_config
    from safetensors.torch import load_file

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config = litgpt_config(model_dir)
    state: dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(config, {}, state, load_file(model_dir / "model.safetensors"))
    # A tied head shares the embedding tensor; clone it so the file stores two plain tensors.
    state = {name: tensor.clone() for name, tensor in state.items()}
    torch.save(state, checkpoint_dir / "lit_model.pth")
    save_config(config, checkpoint_dir)
    for name in _TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, checkpoint_dir / name)


def _collate(rows: list[dict[str, list[int]]]) -> dict:
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    counts = torch.full((len(rows),), ids.shape[1], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone(), "token_counts": {"raw": counts, "raw_plus_prompt_template": counts}}


def _data_module(sequences: list[list[int]], batch_size: int):
    from litgpt.data import DataModule
    from litgpt.prompts import Default

    # litgpt reads `input_ids` from every sample to find the longest sequence.
    samples = [{"input_ids": ids} for ids in sequences]

    class Sequences(DataModule):
        """The benchmark's sequences; validation reuses the first two batches."""

        prompt_style = Default()

        def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None, **kwargs) -> None:
            """Nothing to connect: the sequences are already tokens."""

        def train_dataloader(self) -> DataLoader:
            return DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=_collate)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(samples[: 2 * batch_size], batch_size=batch_size, collate_fn=_collate)

    return Sequences()


class _TimingLogger(Logger):
    def __init__(self, clock: StepClock, losses: list[float]) -> None:
        super().__init__()
        self.clock, self.losses = clock, losses

    @property
    def name(self) -> str:
        return "timing"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if "loss" in metrics:  # a training step; validation logs other keys
            self.clock.tick()
            self.losses.append(float(metrics["loss"]))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def run(spec: RunSpec, checkpoint_dir: Path) -> None:
    """Finetune with ``litgpt.finetune.full.setup`` and write the timings."""
    import litgpt.finetune.full as full
    from litgpt.args import EvalArgs, TrainArgs

    clock, losses = StepClock(), []
    full.choose_logger = lambda *args, **kwargs: _TimingLogger(clock, losses)
    sequences = load_sequences(spec)
    train = TrainArgs(
        save_interval=None,
        log_interval=1,
        global_batch_size=spec.batch_size,
        micro_batch_size=spec.batch_size,
        lr_warmup_steps=1,
        epochs=1,
        max_steps=spec.steps,
        max_seq_length=len(sequences[0]),
        max_norm=None,
        min_lr=spec.lr,
    )
    evaluation = EvalArgs(
        interval=spec.steps + 1, max_new_tokens=1, initial_validation=False, final_validation=False
    )
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": spec.lr, "weight_decay": 0.0}}
    # After training, litgpt saves its hyperparameters by parsing sys.argv as its own command line.
    sys.argv = [sys.argv[0], str(checkpoint_dir)]
    full.setup(
        checkpoint_dir=checkpoint_dir,
        out_dir=Path(spec.work_dir) / "litgpt_out",
        precision="32-true",
        devices=1,
        data=_data_module(sequences, spec.batch_size),
        train=train,
        eval=evaluation,
        optimizer=optimizer,
        seed=spec.seed,
    )
    write_result(spec, clock, losses, {"optimizer": "AdamW", "fused": None, "foreach": None})


def main() -> None:
    """Convert (``--convert``) or run, as the spec says."""
    convert_only = "--convert" in sys.argv
    if convert_only:
        sys.argv.remove("--convert")
    spec = parse_spec(__doc__.splitlines()[0])
    checkpoint_dir = Path(spec.work_dir) / "litgpt_checkpoint"
    if convert_only:
        convert(Path(spec.model_dir), checkpoint_dir)
    else:
        run(spec, checkpoint_dir)


if __name__ == "__main__":
    main()
