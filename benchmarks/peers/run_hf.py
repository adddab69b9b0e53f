"""Runner for the transformers ``Trainer`` and TRL's ``SFTTrainer`` (peer environment ``hf``).

``spec.system`` picks the trainer: ``"transformers"`` or ``"trl"``. Both get the pre-tokenized
sequences with ``labels`` equal to ``input_ids`` (the model shifts them) and no attention mask,
because every position is a real token. They keep their default optimizer implementation, with
the spec's AdamW settings, a constant learning rate and no gradient clipping. TRL runs in fp32 without gradient
checkpointing, like every other system, which overrides two of its defaults. A ``TrainerCallback`` timestamps
``on_step_end``, which fires after each optimizer step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepClock, load_sequences, parse_spec, write_result  # noqa: E402


class _Timing(TrainerCallback):
    def __init__(self, clock: StepClock, losses: list[float]) -> None:
        self.clock = clock
        self.losses = losses

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, sequences: list[list[int]]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self.sequences[index]
        return {"input_ids": ids, "labels": list(ids)}


def _common_args(spec) -> dict:
    return {
        "output_dir": str(Path(spec.work_dir) / spec.system),
        "per_device_train_batch_size": spec.batch_size,
        "max_steps": spec.steps,
        "learning_rate": spec.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,  # 0 turns clipping off
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": spec.seed,
        "train_sampling_strategy": "sequential",  # every system reads the sequences in file order
        "disable_tqdm": True,
    }


def _build_trainer(spec, model, tokenizer, sequences, callback):
    if spec.system == "transformers":
        args = TrainingArguments(**_common_args(spec))
        return Trainer(model=model, args=args, train_dataset=_Sequences(sequences), callbacks=[callback])
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    seq_len = len(sequences[0])
    # SFTConfig defaults to bf16 mixed precision and gradient checkpointing; the benchmark's work
    # is fp32 with stored activations for every system.
    config = SFTConfig(
        **_common_args(spec),
        max_length=seq_len,
        packing=False,
        dataset_num_proc=None,
        bf16=False,
        gradient_checkpointing=False,
    )
    # A dataset with an `input_ids` column counts as tokenized, so SFTTrainer skips its own step.
    dataset = Dataset.from_dict({"input_ids": sequences})
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])


def main() -> None:
    """Train with the trainer named by ``spec.system`` and write the timings."""
    spec = parse_spec(__doc__.splitlines()[0])
    torch.manual_seed(spec.seed)
    sequences = load_sequences(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock, losses = StepClock(), []
    trainer = _build_trainer(spec, model, tokenizer, sequences, _Timing(clock, losses))
    trainer.train()
    # Accelerate wraps the optimizer, and the torch optimizer inside it has the settings.
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    defaults = getattr(optimizer, "defaults", {})
    notes = {
        "optimizer": type(optimizer).__name__,
        "fused": defaults.get("fused"),
        "foreach": defaults.get("foreach"),
        "optim": str(trainer.args.optim),
    }
    write_result(spec, clock, losses, notes)


if __name__ == "__main__":
    main()
