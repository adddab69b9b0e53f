"""Replace a distributed-checkpoint folder only once its successor is complete.

A distributed checkpoint is a folder of shard files that every rank writes. Lightning writes it in
place, so a job killed mid-save leaves a folder mixing two steps' shards. Here the ranks write to
``<name>.partial``, and rank 0 swaps it into place after a barrier: ``<name>`` becomes
``<name>.old``, ``<name>.partial`` becomes ``<name>``, and ``<name>.old`` is removed.

POSIX has no atomic replacement of a non-empty folder, so between the two renames ``<name>`` is
missing for an instant. ``recover`` finds the complete ``<name>.old`` left by a kill in that
instant.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def partial_path(path: Path) -> Path:
    """Where the ranks write the checkpoint that will replace ``path``."""
    return path.with_name(path.name + ".partial")


def _old_path(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_into_place(new: Path, path: Path) -> None:
    """Make the complete checkpoint ``new`` the one at ``path``, removing the previous one."""
    old = _old_path(path)
    remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    remove(old)


def recover(path: Path) -> Path:
    """Return ``path``, or the previous checkpoint a kill mid-swap left at ``<path>.old``."""
    old = _old_path(path)
    if not path.exists() and old.exists():
        log.warning("%s is missing but %s is complete (a save was interrupted); loading it", path, old)
        return old
    return path
