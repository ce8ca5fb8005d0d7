"""lossfloor.ray.train_on_ray (Ray Train V2): two gloo workers, one of them killed once mid-run and
restarted from the last checkpoint, end with one plain process's parameters; Ray's in-process mode
continues a run the local engine started bit for bit; bad input is refused on the driver.

One small Ray instance (2 CPUs) for the module; a multi-worker run starts worker groups (tens of
seconds on a loaded machine), so the module makes only one.
"""

import dataclasses
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from lossfloor.data import load
from lossfloor.errors import InputError
from lossfloor.jobs.engine import Engine
from lossfloor.models import get_preset
from lossfloor.ray.train import train_on_ray
from lossfloor.train import TrainConfig, latest_checkpoint, train
from lossfloor.train.checkpoint import list_checkpoints

# Ray Data's own DataContext copy warns about its deprecated fields
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
              pytest.mark.usefixtures("local_ray")]

TINY = get_preset("tiny")
# tiny with one block per level and 16 channels (190k parameters): seconds per step on a loaded CPU
MICRO = dataclasses.replace(TINY, name="micro", warmup_n_img=0, unet=dataclasses.replace(
    TINY.unet, model_channels=16, num_blocks=1, channels_per_head=16))
SIGMAS = (0.02, 0.2, 1.0, 5.0)


@pytest.fixture(scope="module")
def digits():
    return load("bundled:digits")


def config(**kw):
    base = {"preset": MICRO, "batch_n_img": 32, "duration_n_img": 96, "eval_n_samples": 32,
            "eval_sigmas": SIGMAS, "lr_ref": 0.01, "eval_every_n_img": 64}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def plain(digits):
    """The reference: one plain process, no Ray."""
    return train(config(), digits)


def assert_close_params(state, ref, rel):
    for k, v in ref.items():
        scale = max(float(v.abs().max()), 1e-12)
        assert float((state[k] - v).abs().max()) / scale <= rel, k


class KillLastRankOnce:
    """Worker hooks (`train_on_ray(hooks=...)`): every start is noted in MARKER.starts; the last rank exits
    hard, once per marker file, right after Ray has recorded the first reported checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def on_start(self, rank: int, resume) -> None:
        with open(f"{self.marker}.starts", "a") as f:
            f.write(f"{rank} {resume if resume else 'fresh'}\n")

    def after_report(self, rank: int, world_size: int, metrics: dict) -> None:
        if rank != world_size - 1 or Path(self.marker).exists():
            return
        ray.train.get_all_reported_checkpoints(timeout_s=120)  # wait until Ray has recorded the checkpoint
        Path(self.marker).write_text(f"died at n_img {metrics['n_img']}\n")
        os._exit(1)


@pytest.mark.e2e
def test_two_gloo_workers_survive_a_killed_worker_and_match_one_plain_process(plain, tmp_path):
    # rank 1 exits hard (os._exit) once, after Ray has recorded the first checkpoint (64 images);
    # FailureConfig restarts the group, which resumes from that checkpoint
    marker = tmp_path / "died"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not have tests/
    run = train_on_ray(config(snapshot_every_n_img=64), "bundled:digits", workers=2, storage_path=tmp_path,
                       name="two", max_failures=1, hooks=KillLastRankOnce(marker))
    assert marker.read_text() == "died at n_img 64\n"
    starts = (tmp_path / "died.starts").read_text().splitlines()
    resumed = tmp_path / "two" / "checkpoint-000000000064"
    assert sorted(starts[:2]) == ["0 fresh", "1 fresh"] and sorted(starts[2:]) == [f"0 {resumed}", f"1 {resumed}"]

    # nothing lost, and the global batch split over two ranks: the plain process's parameters up to
    # the all-reduce's summation order
    assert_close_params(run.state()["net"], plain.model_state, rel=1e-5)
    assert run.metrics["n_img"] == 96 and run.metrics["step"] == 3
    assert run.metrics["eval/total"] == pytest.approx(plain.loss_curve[-1]["loss"], rel=1e-4)
    # the run folder reads like the local engine's checkpoint_dir
    folder = tmp_path / "two"
    assert [n for n, _ in list_checkpoints(folder)] == [64, 96]
    assert run.checkpoint == str(folder / "checkpoint-000000000096") == str(latest_checkpoint(folder))
    curve = pq.read_table(folder / "loss_curve.parquet").to_pylist()
    assert [r["images"] for r in curve] == [r["images"] for r in plain.loss_curve]
    for a, b in zip(curve, plain.loss_curve):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert pq.read_table(folder / "train_log.parquet").num_rows == 3
    # the EMA snapshots (no part of Ray's checkpoints) in the run folder, the one before the kill included
    assert sorted(p.name for p in folder.glob("ema-*.pt")) == ["ema-000000000064.pt", "ema-000000000096.pt"]


def test_in_process_mode_continues_a_local_engine_run(plain, digits, tmp_path):
    # the local engine stops at 64 images; Ray (num_workers=0: in this process) finishes the same run
    part = train(config(), digits, checkpoint_dir=tmp_path / "run", stop_n_img=64)
    assert part.n_img == 64
    run = train_on_ray(config(), "bundled:digits", workers=0, storage_path=tmp_path, name="run")
    state = run.state()
    assert state["n_img"] == 96
    for k, v in plain.model_state.items():
        assert torch.equal(state["net"][k], v), k  # one rank, resumed: bit for bit
    assert state["train_log"] == plain.train_log and state["loss_curve"] == plain.loss_curve
    # the same name again resumes a finished run: nothing to do
    again = train_on_ray(config(), "bundled:digits", workers=0, storage_path=tmp_path, name="run")
    assert again.checkpoint == run.checkpoint
    with pytest.raises(InputError, match="already holds a run"):
        train_on_ray(config(), "bundled:digits", workers=0, storage_path=tmp_path, name="run", resume=False)
    with pytest.raises(InputError, match="lr_ref"):  # a different config is refused on the driver
        train_on_ray(config(lr_ref=0.02), "bundled:digits", workers=0, storage_path=tmp_path, name="run")


def test_input_errors_are_found_on_the_driver(tmp_path):
    cases = [
        ({"workers": -1}, "workers"),
        ({"workers": 3}, "batch_n_img"),  # 32 does not split over 3 workers
        ({"workers": 1, "max_failures": -2}, "max_failures"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InputError, match=field):
            train_on_ray(config(), "bundled:digits", storage_path=tmp_path, name="x", **kwargs)
    with pytest.raises(InputError, match="--gpus-per-worker"):  # the engine's settings: checked by the Engine
        Engine(kind="ray", workers=1, gpus_per_worker=-1)
    with pytest.raises(InputError, match=r"nope\.npy"):
        train_on_ray(config(), tmp_path / "nope.npy", workers=1, storage_path=tmp_path, name="x")
    with pytest.raises(InputError, match="expects"):
        train_on_ray(config(preset="tiny32"), "bundled:digits", workers=1, storage_path=tmp_path, name="x")
    assert not (tmp_path / "x").exists()
