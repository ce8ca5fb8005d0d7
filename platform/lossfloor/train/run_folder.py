"""A training run's folder read back: what `lossfloor.train.train` (or Ray Train) left there.

    run = read_run_folder("runs/tiny")
    run.curve_rows[-1]["loss"], run.config.preset, run.checkpoints[-1]

The folder holds loss_curve.parquet and train_log.parquet (`lossfloor.train.curves`; both carry the loop's
schema metadata: config (JSON), forward_flops, run, flop_convention, dataset_fingerprint, class_conditional
("true" when the model sees class labels: its floor is the class-conditional one), started_at,
written_at) and the checkpoint-<n_img>/ folders (`lossfloor.train.checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lossfloor.errors import InputError
from lossfloor.train.checkpoint import list_checkpoints
from lossfloor.train.config import TrainConfig

CURVE_FILE = "loss_curve.parquet"
LOG_FILE = "train_log.parquet"


@dataclass(frozen=True, kw_only=True)
class RunFolder:
    """A run folder's tables, their metadata and its checkpoints (module docstring)."""

    path: Path
    curve: pa.Table  # loss_curve.parquet: one row per evaluation and σ, plus the total (σ null)
    log: pa.Table  # train_log.parquet: one row per logged step
    meta: dict[str, str]  # the loop's schema metadata
    config: TrainConfig
    checkpoints: tuple[Path, ...]  # the complete checkpoints, oldest first

    @cached_property
    def curve_rows(self) -> list[dict]:
        return self.curve.to_pylist()

    @cached_property
    def log_rows(self) -> list[dict]:
        return self.log.to_pylist()

    @property
    def run(self) -> str:
        return self.meta.get("run", "")

    @property
    def forward_flops(self) -> float:
        return float(self.meta.get("forward_flops", "nan"))

    @property
    def span(self) -> tuple[float | None, float | None]:
        """(started_at, written_at): the training's own wall-clock span (unix seconds), or (None, None)."""
        if "started_at" not in self.meta:
            return None, None
        return float(self.meta["started_at"]), float(self.meta["written_at"])

    def last_eval(self) -> tuple[int | None, list[dict], dict | None]:
        """(images, per-σ rows ascending σ, total row) of the last evaluation; (None, [], None) before any."""
        rows = self.curve_rows
        last = max((r["images"] for r in rows), default=None)
        per_sigma = sorted((r for r in rows if r["images"] == last and r["sigma"] is not None), key=lambda r: r["sigma"])
        total = next((r for r in rows if r["images"] == last and r["sigma"] is None), None)
        return last, per_sigma, total


def read_run_folder(path: str | os.PathLike) -> RunFolder:
    """The run folder at `path`; InputError naming the file when a table is missing, unreadable or has no
    training config in its metadata."""
    out = Path(path)
    curve, log = _read(out / CURVE_FILE), _read(out / LOG_FILE)
    meta = {k.decode(): v.decode() for k, v in (curve.schema.metadata or {}).items()}
    if "config" not in meta:
        raise InputError(f"{out / CURVE_FILE}: no training config in its metadata (not written by lossfloor.train?)")
    return RunFolder(path=out, curve=curve, log=log, meta=meta, config=TrainConfig.from_dict(json.loads(meta["config"])),
                     checkpoints=tuple(p for _, p in list_checkpoints(out)))


def _read(path: Path) -> pa.Table:
    if not path.is_file():
        raise InputError(f"{path}: not found (expected the tables a training run writes to its folder)")
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable parquet file ({e.__class__.__name__})") from None
