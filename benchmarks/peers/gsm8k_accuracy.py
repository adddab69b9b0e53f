"""Greedy GSM8K accuracy of a causal LM on a fixed held-out subset (the first N test questions).

Each question is rendered with the model's chat template as the user turn, exactly as
``SFTDataModule`` renders prompts for training, and answered greedily. A completion is correct
when its final number (after the last ``####``, otherwise the last number in the text) equals the
reference's final number. Runs in lit_tune's environment; the model is any lit_tune source (a
GGUF file, a Hugging Face folder such as an export).

    python benchmarks/peers/gsm8k_accuracy.py --model runs/sft_smollm2_gsm8k/hf_model \\
        --data ../shared/data/gsm8k/test.jsonl --num-questions 50 --output after.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from lit_tune.data.formatting import encode_prompt
from lit_tune.data.sources import load_rows
from lit_tune.models import load_model, load_tokenizer
from lit_tune.rl.rewards import FINAL_ANSWER_MARKER, extract_final_number

log = logging.getLogger(__name__)


def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Answer each question greedily; prompts are left-padded within a batch."""
    completions = []
    for start in range(0, len(questions), batch_size):
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        log.info("Answered %d/%d questions.", len(completions), len(questions))
    return completions


def score(completions: list[str], references: list[str]) -> dict:
    """Count correct final answers and completions that end with a ``#### N`` line."""
    correct = []
    for completion, reference in zip(completions, references, strict=True):
        predicted, expected = extract_final_number(completion), extract_final_number(reference)
        correct.append(predicted is not None and abs(predicted - expected) < 1e-6)
    with_marker = sum(FINAL_ANSWER_MARKER in completion for completion in completions)
    return {"correct": sum(correct), "total": len(correct), "accuracy": sum(correct) / len(correct),
            "final_answer_lines": with_marker, "per_question": correct}


def main(argv: list[str] | None = None) -> None:
    """Evaluate the model named on the command line and write the scores as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="lit_tune model source (folder or .gguf file)")
    parser.add_argument("--data", required=True, help="GSM8K-format JSONL with question/answer")
    parser.add_argument("--num-questions", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    rows = load_rows(args.data)[0][: args.num_questions]
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    start = time.perf_counter()
    completions = generate_answers(model, tokenizer, [r["question"] for r in rows], args.max_new_tokens, args.batch_size)
    result = score(completions, [r["answer"] for r in rows])
    result.update(model=args.model, seconds=round(time.perf_counter() - start, 1), completions=completions)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"{result['correct']}/{result['total']} correct ({result['accuracy']:.1%}), "
          f"{result['final_answer_lines']} with a '####' line, {result['seconds']} s")


if __name__ == "__main__":
    main()
