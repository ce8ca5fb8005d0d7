"""`--engine ray`: the local engine's numbers for 1 and 2 workers, resumable after an interruption.

One small Ray instance (2 CPUs) is shared by the whole module; every estimate starts a fresh actor pool
(a few seconds each), so the tests keep the number of Ray runs small.
"""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import lossfloor.cli
import lossfloor.data
import lossfloor.ray.estimate
from lossfloor.data import prepare_shards, read_meta
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, estimate, estimate_conditional, total_variance
from lossfloor.floor.resume import KEY_FILE
from lossfloor.jobs.engine import Engine
from lossfloor.ray import estimate_ray
from lossfloor.ray.estimate import batches_per_task, shard_total_variance

# Ray Data's own DataContext copy warns about its deprecated fields
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
              pytest.mark.usefixtures("local_ray")]

SIGMAS = np.array([0.05, 0.3, 1.0, 4.0])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(5, 12))
    return (centres[rng.integers(0, 5, 300)] + 0.4 * rng.normal(size=(300, 12))).astype(np.float32)  # (300, 12)


def assert_same(a, b):
    """J*, stderr, bias and interval equal to 1e-9 relative (the engines are in fact bit-identical)."""
    for name in ("j_star", "stderr", "bias", "ci_low", "ci_high"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=0, err_msg=name)
    assert (a.n_queries, a.n_batches) == (b.n_queries, b.n_batches)
    assert np.array_equal(a.subset_size, b.subset_size)


def test_one_worker_matches_local(data):
    cfg = EstimatorConfig(estimator="cdol", subset_size=48, seed=5, rows_per_batch=111)  # 3 blocks of 37 queries
    local = estimate(data, SIGMAS, cfg, progress=False)
    run = estimate_ray(data, SIGMAS, cfg, engine=Engine(kind="ray", workers=1), progress=False)
    assert_same(run.result, local)
    assert run.result.computed == local.n_batches == 9
    assert run.kernel_s > 0


def test_tasks_carry_several_batches_when_there_are_many():
    assert [batches_per_task(n, 1) for n in (1, 15, 16, 32, 100, 10_000)] == [1, 1, 1, 2, 6, 8]
    assert batches_per_task(100, 2) == 3


@pytest.mark.e2e  # 20 s: the end-to-end tier (two workers also match local across two nodes there)
def test_two_workers_match_local_for_knn_with_automatic_L(data, monkeypatch):
    # knn: each actor deduplicates and indexes the data itself; automatic L adds passes at 2L, 4L over
    # the σ still above the target; the 2-worker order of results must not matter, nor several estimator
    # batches per Ray task (3 here: 12 batches, 2 workers, 2 tasks per worker)
    monkeypatch.setattr(lossfloor.ray.estimate, "TASKS_PER_WORKER", 2)
    assert batches_per_task(12, 2) == 3
    cfg = EstimatorConfig(estimator="knn", subset_size=8, seed=11, rows_per_batch=75, rel_error=0.1)  # L 8..32
    local = estimate(data, SIGMAS, cfg, progress=False)
    run = estimate_ray(data, SIGMAS, cfg, engine=Engine(kind="ray", workers=2), progress=False)
    assert_same(run.result, local)
    assert len(run.result.passes) >= 2 and run.result.passes[0].computed == 12
    assert run.search_s > 0 and run.index_build_s > 0


def test_class_conditional_floor_spreads_its_classes_over_the_workers_with_the_local_numbers(data, tmp_path,
                                                                                              monkeypatch):
    # three classes of 100 samples (300 queries), 10 batches each; 7 batches per Ray task, so tasks straddle two classes and
    # an actor makes a class's data (its knn index) when that class's first batch reaches it
    monkeypatch.setattr(lossfloor.ray.estimate, "TASKS_PER_WORKER", 2)
    labels = np.arange(len(data)) % 3
    cfg = EstimatorConfig(estimator="knn", subset_size=8, seed=4, rows_per_batch=30)
    local = estimate_conditional(data, labels, SIGMAS, cfg, progress=False)
    run = estimate_ray(data, SIGMAS, cfg, engine=Engine(kind="ray", workers=2), labels=labels,
                       work_dir=tmp_path / "w", progress=False)
    assert_same(run.result, local)
    assert run.result.class_conditional and run.result.total_variance == local.total_variance
    assert run.result.computed == 30 and run.index_build_s > 0


class Interrupt(Exception):
    pass


@pytest.mark.e2e  # 12 s: the end-to-end tier (with the multi-node kill test)
def test_resume_after_interruption(data, tmp_path):
    # 900 queries; cdol's subset blocks of N/8 = 37 queries round 64 up to 74 queries a batch: 13 batches
    cfg = EstimatorConfig(estimator="cdol", subset_size=64, seed=2, rows_per_batch=64)
    local = estimate(data, SIGMAS, cfg, progress=False)
    first: list[int] = []

    def stop_after_6(part):
        first.append(part.batch_index)
        if len(first) == 6:
            raise Interrupt  # as if the job were killed half-way

    with pytest.raises(Interrupt):
        estimate_ray(data, SIGMAS, cfg, engine=Engine(kind="ray", workers=2), work_dir=tmp_path / "w",
                     progress=False, on_batch=stop_after_6)
    assert (tmp_path / "w" / KEY_FILE).is_file()

    second: list[int] = []
    run = estimate_ray(data, SIGMAS, cfg, engine=Engine(kind="ray", workers=2), work_dir=tmp_path / "w",
                       progress=False, on_batch=lambda p: second.append(p.batch_index))
    (stats,) = run.result.passes
    assert (stats.n_batches, stats.reused, stats.computed) == (13, 6, 7)
    assert not set(first) & set(second) and sorted(first + second) == list(range(13))
    assert_same(run.result, local)

    # a finished work folder: nothing left to compute (no actor pool is even started)
    again = estimate_ray(data, SIGMAS, cfg, engine=Engine(kind="ray", workers=2), work_dir=tmp_path / "w", progress=False)
    assert again.result.computed == 0 and again.kernel_s == 0
    assert_same(again.result, local)


def test_cli_ray_engine_equals_local_and_reuses_default_work_dir(data, tmp_path, capsys):
    # the same queries whatever the engine, workers and batch size (every query's noise is its own)
    np.save(tmp_path / "d.npy", data)
    common = ["estimate", "--data", str(tmp_path / "d.npy"), "--sigmas", "0.05,0.3,1,4", "--estimator", "exact",
              "--json"]
    assert lossfloor.cli.main([*common, "--rows-per-batch", "60", "--out", str(tmp_path / "local.parquet")]) == 0
    local_rows = json.loads(capsys.readouterr().out)
    argv = [*common, "--rows-per-batch", "250", "--engine", "ray", "--workers", "2",
            "--out", str(tmp_path / "ray.parquet")]
    assert lossfloor.cli.main(argv) == 0
    ray_rows = json.loads(capsys.readouterr().out)
    for a, b in zip(local_rows, ray_rows):  # float32 GEMMs of other shapes: round-off only
        assert a["j_star"] == pytest.approx(b["j_star"], rel=1e-6, abs=0)
        assert a["stderr"] == pytest.approx(b["stderr"], rel=1e-5, abs=0)
    t_local, t_ray = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert t_local.column_names == t_ray.column_names
    (work,) = tmp_path.glob("lossfloor-work-*")  # the default: next to --out, named by a hash
    assert len(list(work.glob("part-*.npz"))) >= 1
    assert lossfloor.cli.main(argv) == 0  # rerun: everything reused
    assert json.loads(capsys.readouterr().out) == ray_rows


@pytest.mark.e2e  # 16 s: the end-to-end tier
def test_shard_folder_is_read_by_the_workers_with_the_local_numbers(data, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "d.npy", data)
    shards = prepare_shards(tmp_path / "d.npy", tmp_path / "shards", rows_per_shard=70)  # 5 shards, the last short
    # the driver must not load the samples: only meta.json, Ray Data's moments pass and the workers read them
    monkeypatch.setattr(lossfloor.data, "load", lambda *a, **k: pytest.fail("the driver loaded the data set"))
    assert shard_total_variance(shards)[0] == pytest.approx(total_variance(torch.from_numpy(data)), rel=1e-12)
    common = ["estimate", "--sigmas", "0.05,0.3,1,4", "--estimator", "cdol", "--subset-size", "40",
              "--rows-per-batch", "25", "--seed", "3", "--json"]
    argv = [*common, "--data", str(shards), "--engine", "ray", "--workers", "2", "--out", str(tmp_path / "r.parquet")]
    assert lossfloor.cli.main(argv) == 0
    ray_rows = json.loads(capsys.readouterr().out)
    local = estimate(data, SIGMAS, EstimatorConfig(estimator="cdol", subset_size=40, rows_per_batch=25, seed=3),
                     progress=False)
    np.testing.assert_allclose([r["j_star"] for r in ray_rows], local.j_star, rtol=1e-9, atol=0)
    np.testing.assert_allclose([r["stderr"] for r in ray_rows], local.stderr, rtol=1e-9, atol=0)
    assert ray_rows[0]["total_variance"] == pytest.approx(local.total_variance, rel=1e-12)
    assert ray_rows[0]["dataset_fingerprint"] == read_meta(shards).fingerprint

    # knn: the two actors map one node-cache copy of the data, its distinct points and its FAISS index
    knn = EstimatorConfig(estimator="knn", subset_size=16, rows_per_batch=25, seed=3)
    run = estimate_ray(str(shards), SIGMAS, knn, engine=Engine(kind="ray", workers=2), progress=False)
    assert_same(run.result, estimate(data, SIGMAS, knn, progress=False))
    (entry,) = (Path(os.environ["LOSSFLOOR_NODE_CACHE"]) / read_meta(shards).fingerprint[:32]).parent.glob(
        read_meta(shards).fingerprint[:32])
    assert {"x.npy", "dedup.npz"} <= {p.name for p in entry.iterdir()}


def test_engine_input_errors(data):
    with pytest.raises(InputError, match="--workers"):
        Engine(kind="ray", workers=0)
    with pytest.raises(InputError, match="--gpus-per-worker"):
        Engine(kind="ray", gpus_per_worker=-1)
    with pytest.raises(InputError, match="--gpus-per-worker"):
        estimate_ray(data, SIGMAS, EstimatorConfig(device="cuda"), engine=Engine(kind="ray"), progress=False)
