"""lit_tune.losses on vocabulary-sharded logits under loss_parallel(), on 2 CPU processes (gloo).

Each rank runs the cases below on DTensor logits sharded on the vocabulary, then saves its loss
and its shard of the logits gradient. The tests rebuild the same inputs here and compare against
unsharded ``F.cross_entropy``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_tune.losses import count_targets, cross_entropy_sum, token_cross_entropy

TOL = {"atol": 1e-6, "rtol": 0.0}
WORLD = 2

CASES_SCRIPT = textwrap.dedent(
    '''
    import sys

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    from lit_tune.losses import count_targets, cross_entropy_sum, token_cross_entropy, token_log_probs

    # Inputs come from the test file, so both sides build exactly the same tensors.
    sys.path.insert(0, sys.argv[2])
    from test_loss_parallel import (
        all_masked_inputs,
        data_parallel_inputs,
        smoothing_inputs,
        uneven_inputs,
    )

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}


    def sharded(logits):
        return distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()


    def mean_loss(logits, targets, label_smoothing=0.0):
        total = cross_entropy_sum(logits, targets, label_smoothing=label_smoothing)
        return total / count_targets(targets).clamp(min=1)


    def run(name, logits, targets, fn):
        with loss_parallel():
            value = fn(logits, targets)
            value.sum().backward()
        results[name] = {"value": value.detach(), "grad": logits.grad.to_local()}


    logits, targets = smoothing_inputs()
    run("smoothing", sharded(logits), targets, lambda x, t: mean_loss(x, t, 0.1))
    logits, targets = all_masked_inputs()
    run("all_masked", sharded(logits), targets, mean_loss)
    logits, targets = smoothing_inputs()
    run("log_probs", sharded(logits), targets, token_log_probs)
    logits, targets = uneven_inputs()
    run("uneven", sharded(logits), targets, lambda x, t: mean_loss(x, t, 0.1))

    try:
        token_cross_entropy(distribute_tensor(logits, mesh, [Replicate()]), targets)
        results["replicated_error"] = None
    except ValueError as error:
        results["replicated_error"] = str(error)

    # Data parallel: each rank has its own plain logits, and the loss is normalised by the
    # labelled-token count over both ranks.
    logits, targets = data_parallel_inputs(rank)
    logits.requires_grad_()
    total = cross_entropy_sum(logits, targets)
    count = count_targets(targets).float()
    reduced = torch.stack([total.detach(), count])
    dist.all_reduce(reduced)
    loss = total / reduced[1]
    loss.backward()
    results["data_parallel"] = {"value": reduced[0] / reduced[1], "grad": logits.grad}

    torch.save(results, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
    '''
)


def smoothing_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[1, 2, 8]`` (vocabulary 8) and targets ``[1, 6]``."""
    logits = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(3))
    return logits, torch.tensor([[1, 6]])


def all_masked_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[1, 5, 10]`` and targets that are all -100."""
    logits = torch.randn(1, 5, 10, generator=torch.Generator().manual_seed(4))
    return logits, torch.full((1, 5), -100)


def uneven_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[1, 3, 9]``: vocabulary 9 splits 5 + 4 over two ranks; targets on both sides."""
    logits = torch.randn(1, 3, 9, generator=torch.Generator().manual_seed(5))
    return logits, torch.tensor([[0, 8, -100]])


def data_parallel_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: targets all -100; rank 1: targets ``[3, -100, 7]``; logits ``[1, 3, 10]``."""
    logits = torch.randn(1, 3, 10, generator=torch.Generator().manual_seed(10 + rank))
    targets = torch.full((1, 3), -100) if rank == 0 else torch.tensor([[3, -100, 7]])
    return logits, targets


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("loss_parallel")
    script = out / "cases.py"
    script.write_text(CASES_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(script), str(out), str(Path(__file__).parent),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _full_grad(ranks: list[dict], case: str) -> torch.Tensor:
    return torch.cat([r[case]["grad"] for r in ranks], dim=-1)


def _reference(logits: torch.Tensor, targets: torch.Tensor, **kwargs: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.clone().requires_grad_()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, **kwargs)
    loss.backward()
    return loss.detach(), logits.grad


def test_label_smoothing_sharded_matches_unsharded(ranks: list[dict]) -> None:
    logits, targets = smoothing_inputs()
    loss, grad = _reference(logits, targets, label_smoothing=0.1)
    for rank in ranks:
        torch.testing.assert_close(rank["smoothing"]["value"], loss, **TOL)
    torch.testing.assert_close(_full_grad(ranks, "smoothing"), grad, **TOL)


def test_uneven_vocabulary_split_matches_unsharded(ranks: list[dict]) -> None:
    logits, targets = uneven_inputs()
    loss, grad = _reference(logits, targets, label_smoothing=0.1)
    for rank in ranks:
        torch.testing.assert_close(rank["uneven"]["value"], loss, **TOL)
    assert [r["uneven"]["grad"].shape[-1] for r in ranks] == [5, 4]
    torch.testing.assert_close(_full_grad(ranks, "uneven"), grad, **TOL)


def test_replicated_dtensor_logits_raise(ranks: list[dict]) -> None:
    message = ranks[0]["replicated_error"]
    assert message is not None
    assert "(Replicate(),)" in message
    assert "Shard(-1)" in message


def test_all_masked_sharded_gives_zero(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["all_masked"]["value"].item() == 0.0
        grad = rank["all_masked"]["grad"]
        assert torch.isfinite(grad).all()
        assert torch.count_nonzero(grad) == 0


def test_log_probs_sharded_match_log_softmax(ranks: list[dict]) -> None:
    logits, targets = smoothing_inputs()
    logits.requires_grad_()
    expected = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected.sum().backward()
    for rank in ranks:
        torch.testing.assert_close(rank["log_probs"]["value"], expected.detach(), **TOL)
    torch.testing.assert_close(_full_grad(ranks, "log_probs"), logits.grad, **TOL)


def test_data_parallel_all_masked_rank(ranks: list[dict]) -> None:
    inputs = [data_parallel_inputs(r) for r in range(WORLD)]
    logits = torch.cat([x for x, _ in inputs], dim=1)  # [1, 6, 10]
    targets = torch.cat([t for _, t in inputs], dim=1)  # 2 labelled tokens
    loss, grad = _reference(logits, targets)
    for rank in ranks:
        torch.testing.assert_close(rank["data_parallel"]["value"], loss, **TOL)
    assert torch.count_nonzero(ranks[0]["data_parallel"]["grad"]) == 0
    torch.testing.assert_close(ranks[1]["data_parallel"]["grad"], grad[:, 3:], **TOL)


def test_label_smoothing_plain_matches_torch() -> None:
    logits, targets = smoothing_inputs()
    targets = torch.tensor([[1, -100]])
    losses = token_cross_entropy(logits, targets, label_smoothing=0.1)
    expected = F.cross_entropy(logits[0], targets[0], label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(losses[0], expected, **TOL)


def test_all_masked_plain_gives_zero() -> None:
    logits, targets = all_masked_inputs()
    logits.requires_grad_()
    loss = cross_entropy_sum(logits, targets) / count_targets(targets).clamp(min=1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0
