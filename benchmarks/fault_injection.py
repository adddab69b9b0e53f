"""Kill a short SFT run at random steps (SIGTERM and SIGKILL), resume each time, compare weights.

Parent mode (default) runs one uninterrupted reference fit, then the same fit again while killing
it at random steps and resuming from the newest checkpoint, and checks that the final weights are
equal within 1e-6::

    python benchmarks/fault_injection.py --faults 6 --max-steps 40 --seed 0

Child mode (``--child``) is the fit itself: the tiny model on built-in data, a checkpoint every
``--every`` steps written atomically, and SIGTERM handled by ``PreemptionCheckpoint``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from safetensors.torch import save_file

    from lit_tune import SFTDataModule, SFTModule
    from lit_tune.callbacks.preemption import PreemptionCheckpoint
    from lit_tune.checkpoint_io import AtomicCheckpointIO

    class Progress(Callback):
        """Append each step's loss to a JSONL file, and send SIGTERM to this process on request."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with open(args.losses, "a") as handle:
                handle.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")
            if args.sigterm_at and trainer.global_step == args.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)

    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    module = SFTModule(model="tiny", export=False, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    data = SFTDataModule(batch_size=4, max_seq_len=64, val_fraction=0.0, seed=1)
    checkpoints = ModelCheckpoint(dirpath=args.root, every_n_train_steps=args.every, save_last=True, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Progress runs first, so every step whose end a checkpoint records has its loss logged.
        callbacks=[checkpoints, Progress(), PreemptionCheckpoint(dirpath=args.root)],
        plugins=[AtomicCheckpointIO()],
    )
    ckpt_path = _newest_checkpoint(Path(args.root)) if args.resume else None
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    weights = {k: v.contiguous() for k, v in module.model.state_dict().items()}
    save_file(weights, str(Path(args.root) / "final.safetensors"))


def _newest_checkpoint(root: Path) -> str | None:
    """Return the checkpoint with the highest global step, or None."""
    import torch

    best, best_step = None, -1
    for path in root.glob("*.ckpt"):
        step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        if step > best_step:
            best, best_step = path, step
    return str(best) if best else None


def _last_step(losses: Path) -> int:
    if not losses.exists():
        return 0
    lines = losses.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _run_child(root: Path, max_steps: int, every: int, resume: bool, extra: list[str] = ()) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", "--root", str(root), "--max-steps", str(max_steps)]
    command += ["--every", str(every), "--losses", str(root / "losses.jsonl"), *extra]
    if resume:
        command.append("--resume")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _inject(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    rng = random.Random(args.seed)
    work = Path(args.workdir)
    reference, faulty = work / "reference", work / "faulty"
    for folder in (reference, faulty):
        folder.mkdir(parents=True, exist_ok=True)
    child = _run_child(reference, args.max_steps, args.every, resume=False)
    if child.wait(timeout=args.timeout) != 0:
        raise RuntimeError(f"Reference run failed:\n{child.stderr.read()[-2000:]}")

    survived = 0
    for fault in range(args.faults):
        kind = "SIGTERM" if fault % 2 == 0 else "SIGKILL"
        done = _last_step(faulty / "losses.jsonl")
        target = min(args.max_steps - 1, done + rng.randint(2, max(3, args.max_steps // args.faults)))
        child = _run_child(faulty, args.max_steps, args.every, resume=fault > 0)
        deadline = time.monotonic() + args.timeout
        while child.poll() is None and _last_step(faulty / "losses.jsonl") < target:
            if time.monotonic() > deadline:
                child.kill()
                raise TimeoutError(f"Fault {fault}: the run did not reach step {target}.")
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM if kind == "SIGTERM" else signal.SIGKILL)
        code = child.wait(timeout=args.timeout)
        expected = 0 if kind == "SIGTERM" else -signal.SIGKILL
        if code != expected:
            raise RuntimeError(f"Fault {fault} ({kind}): exit status {code}, expected {expected}.\n{child.stderr.read()[-2000:]}")
        survived += 1
        print(f"fault {fault}: {kind} at step {_last_step(faulty / 'losses.jsonl')}, exit status {code}")

    child = _run_child(faulty, args.max_steps, args.every, resume=True)
    if child.wait(timeout=args.timeout) != 0:
        raise RuntimeError(f"Final resume failed:\n{child.stderr.read()[-2000:]}")
    want, got = load_file(reference / "final.safetensors"), load_file(faulty / "final.safetensors")
    worst = max(float((want[k] - got[k]).abs().max()) for k in want)
    # A step redone after SIGKILL appears twice in the log; its last value is the one that counts.
    want_losses, got_losses = _losses_by_step(reference), _losses_by_step(faulty)
    loss_gap = max(abs(want_losses[s] - got_losses[s]) for s in want_losses)
    if sorted(want_losses) != sorted(got_losses):
        raise RuntimeError("The interrupted run logged other steps than the uninterrupted one.")
    print(f"faults injected and survived: {survived}")
    print(f"max weight difference vs uninterrupted: {worst:.3e}; max loss difference: {loss_gap:.3e}")
    return 0 if worst <= 1e-6 and loss_gap <= 1e-6 else 1


def _losses_by_step(root: Path) -> dict[int, float]:
    losses = {}
    for line in (root / "losses.jsonl").read_text().splitlines():
        entry = json.loads(line)
        losses[entry["step"]] = entry["loss"]
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help="run the fit itself (used by the parent)")
    parser.add_argument("--root", help="child: checkpoint and output folder")
    parser.add_argument("--losses", help="child: JSONL file receiving each step's loss")
    parser.add_argument("--resume", action="store_true", help="child: resume from the newest checkpoint")
    parser.add_argument("--sigterm-at", type=int, default=0, help="child: send SIGTERM to itself at this step")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps of the fit")
    parser.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    parser.add_argument("--faults", type=int, default=6, help="parent: faults to inject, alternating SIGTERM and SIGKILL")
    parser.add_argument("--seed", type=int, default=0, help="parent: seed choosing the kill steps")
    parser.add_argument("--workdir", default="fault_injection_run", help="parent: scratch folder")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for each run")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return 0
    return _inject(args)


if __name__ == "__main__":
    sys.exit(main())
