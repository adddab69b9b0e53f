"""Shared test helpers: quiet CPU trainers and small in-memory data."""

from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, for a distributed launch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_trainer(**kwargs) -> L.Trainer:
    """A single-process CPU trainer with logging, checkpoints and progress bars off unless asked."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # One intra-op thread: on a shared 2-core machine idle threads spin and slow everything down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
