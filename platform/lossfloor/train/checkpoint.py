"""Atomic checkpoints and EMA snapshots as plain state dicts (no pickled code; torch.load weights_only).

Layout of a run's checkpoint_dir:
    checkpoint-<n_img:012d>/state.pt   training state: model, uncertainty head, optimizer, EMAs,
                                       schedule tracker, images seen, logs, config (a dict)
    ema-<n_img:012d>.pt                post-hoc EMA snapshot (every EMA with its gamma)
    loss_curve.parquet, train_log.parquet
Every file or folder is written under a temporary name in the same folder and renamed when complete,
so a crash never leaves a half-written checkpoint under a final name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lossfloor.atomic import write_atomic
from lossfloor.errors import InputError

CHECKPOINT_RE = re.compile(r"checkpoint-(\d{12})")
SNAPSHOT_RE = re.compile(r"ema-(\d{12})\.pt")
STATE_FILE = "state.pt"


def checkpoint_name(n_img: int) -> str:
    return f"checkpoint-{int(n_img):012d}"


def snapshot_name(n_img: int) -> str:
    return f"ema-{int(n_img):012d}.pt"


def save_checkpoint(directory: str | os.PathLike, n_img: int, state: dict,
                    files: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """Write checkpoint-<n_img>/state.pt (plus `files`: name -> write(path)) atomically: everything goes
    into a temporary folder that is renamed into place when complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(n_img)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        torch.save(state, tmp / STATE_FILE)
        for name, write in (files or {}).items():
            write(tmp / name)
        if final.exists():  # a rerun of the same point: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=directory))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(n_img, path) of the complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir()
             if (m := CHECKPOINT_RE.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The state dict of a checkpoint folder (or its state.pt)."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"checkpoint {path}: no {STATE_FILE} found (expected a checkpoint-<n_img> folder)")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise InputError(f"checkpoint {path}: cannot be read ({e.__class__.__name__})") from None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep = 0: delete nothing)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def save_snapshot(directory: str | os.PathLike, snapshot: dict) -> Path:
    """Write ema-<n_img>.pt (a `PowerFunctionEMA.snapshot` dict) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_atomic(directory / snapshot_name(snapshot["n_img"]), lambda p: torch.save(snapshot, p))


def read_snapshots(directory: str | os.PathLike) -> list[dict]:
    """Every EMA snapshot in `directory`, oldest first (input of `posthoc_ema`). The tensors are memory-
    mapped from the files, not read into memory: a large network's snapshots (both EMAs, float32, at
    every evaluation point) can exceed the machine's memory many times over."""
    directory = Path(directory)
    paths = sorted(p for p in directory.iterdir() if SNAPSHOT_RE.fullmatch(p.name)) if directory.is_dir() else []
    return [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
