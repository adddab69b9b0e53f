"""Per-rank peak memory of the output projection plus cross entropy: loss parallel (tp=2) vs tp=1.

The step is: hidden states ``[1, seq, hidden]`` → output projection ``Linear(hidden, vocab)`` →
``lit_tune.losses.cross_entropy_sum`` → mean over tokens → backward. With tp=1 one process runs
it on full logits (``F.cross_entropy``). With tp=2 the projection is column-parallel with
``Shard(-1)`` DTensor output, as FSDP2Strategy sets it up for loss parallel, and the loss and
backward run inside ``loss_parallel()``, so each rank has half of the vocabulary. The
vocabulary-sized buffers (logits, softmax, their gradient) dominate both peaks.

Peak memory is the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) during the step, minus the resident set before it, so it needs Linux.
Both measurements come from one run of this script on CPU with gloo:

    python benchmarks/bench_loss_parallel.py --vocab 131072 --seq 2048 --hidden 128
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from lit_tune.losses import count_targets, cross_entropy_sum
from lit_tune.strategies._parallelize import loss_parallel_output_style

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _measure(step: Callable[[], None]) -> tuple[float, float]:
    """Run ``step`` twice and return the second run's peak memory above its start (MiB) and time.

    The first run is a warm-up, so one-time allocations (thread pools, communication buffers,
    caches) do not count.
    """
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    return (_status_kib("VmHWM") - before) / 1024, elapsed


def _inputs(args: argparse.Namespace) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(1, args.seq, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (1, args.seq))
    return head, hidden, targets


def _forward_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # [1, seq, vocab], a DTensor sharded on vocab under tensor parallel
    return cross_entropy_sum(logits, targets) / count_targets(targets)


def _forward_torch_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # PyTorch's own path: F.cross_entropy on the sharded DTensor under loss_parallel().
    logits = head(hidden).flatten(0, 1)  # [seq, vocab]
    loss = F.cross_entropy(logits, targets.flatten(), reduction="sum") / targets.numel()
    return loss.full_tensor()


def _loss_step(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, forward: Callable = _forward_loss
) -> None:
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    # As in a Lightning step, the logits go out of scope before backward; only what autograd
    # saved for backward stays alive.
    loss = forward(head, hidden, targets)
    loss.backward()


def _worker(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)

    # A one-rank mesh per process: tp=1 through the same vocabulary-parallel code as tp=2.
    own_group, _ = dist.new_subgroups(group_size=1)
    own_mesh = DeviceMesh.from_group(own_group, "cpu")

    # tp=1 runs on rank 0 alone, so the measurements do not compete for memory.
    if rank == 0:
        head, hidden, targets = _inputs(args)
        results["tp1"] = _measure(lambda: _loss_step(head, hidden, targets))
        parallelize_module(head, own_mesh, loss_parallel_output_style())
        results["tp1_sharded_code"] = _measure(lambda: _loss_step(head, hidden, targets))
        del head, hidden, targets
    dist.barrier()

    mesh = init_device_mesh("cpu", (2,))
    head, hidden, targets = _inputs(args)
    parallelize_module(head, mesh, loss_parallel_output_style())

    def sharded_step() -> None:
        with loss_parallel():
            _loss_step(head, hidden, targets)

    def torch_sharded_step() -> None:
        with loss_parallel():
            _loss_step(head, hidden, targets, _forward_torch_loss)

    results[f"tp2_rank{rank}"] = _measure(sharded_step)
    results[f"tp2_torch_rank{rank}"] = _measure(torch_sharded_step)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    """Run both measurements and print the per-rank peaks and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072, help="vocabulary size (classes)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens in the batch")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the projection")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = parser.parse_args()

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(args, _free_port(), results), nprocs=2, join=True)
        results = dict(results)

    logits_mib = args.seq * args.vocab * 4 / MIB
    tp1_peak, tp1_time = results["tp1"]
    tp2_peak = max(results["tp2_rank0"][0], results["tp2_rank1"][0])
    tp2_time = max(results["tp2_rank0"][1], results["tp2_rank1"][1])
    print(f"vocab={args.vocab} seq={args.seq} hidden={args.hidden}; fp32 logits {logits_mib:.0f} MiB")
    same_peak = results["tp1_sharded_code"][0]
    torch_peak = max(results["tp2_torch_rank0"][0], results["tp2_torch_rank1"][0])
    rows = [
        ("tp=1, F.cross_entropy", results["tp1"]),
        ("tp=1, lit_tune vocabulary-parallel code", results["tp1_sharded_code"]),
        *[(f"tp=2 rank {r}, lit_tune loss parallel", results[f"tp2_rank{r}"]) for r in range(2)],
        *[(f"tp=2 rank {r}, F.cross_entropy in loss_parallel()", results[f"tp2_torch_rank{r}"]) for r in range(2)],
    ]
    for label, (peak, elapsed) in rows:
        print(f"{label:<48} peak {peak:6.0f} MiB  {elapsed:5.1f} s")
    print(f"peak ratio tp=2 / tp=1, same lit_tune code:     {tp2_peak / same_peak:.3f}  (expected about 0.5)")
    print(f"peak ratio tp=2 lit_tune / tp=1 F.cross_entropy: {tp2_peak / tp1_peak:.3f}")
    print(f"peak ratio tp=2 torch / tp=1 F.cross_entropy:    {torch_peak / tp1_peak:.3f}")
    print(f"time ratio tp=2 lit_tune / tp=1 F.cross_entropy: {tp2_time / tp1_time:.2f}")


if __name__ == "__main__":
    main()
