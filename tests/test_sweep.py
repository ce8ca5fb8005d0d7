"""`lossfloor sweep` on Ray Tune, end to end on 2 CPUs with the tiny preset and the bundled digits:

- a 4-trial random sweep (+ the EDM2 baseline) with ASHA, interrupted (as ^C) after two trials ended and
  resumed by the same command: finished trials are not rerun (per-trial start markers), ASHA stops weak
  trials early, results.parquet / best.json / the figures are right, and MLflow holds one parent (best
  configuration, gain) with one child per trial;
- an Optuna sweep with multi-worker trials (Ray Train V2 inside the Tune trial, 2 gloo workers) and the
  Fréchet-distance objective, reported at every evaluation through the Train callback;
- bad input: one line, exit 2, nothing started.

Trials run one at a time (--max-concurrent 1), so the ASHA decisions are the same on every run: each
trial meets the same earlier trials at the rungs with the same (seeded, deterministic) objectives.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from ray import tune

import lossfloor.ray.sweep
from lossfloor.cli import main
from lossfloor.pages.html import is_offline_html
from lossfloor.tracking import PARENT_RUN_TAG, client

REPO = Path(__file__).resolve().parent.parent
SPACE = "w_max: {loguniform: [5, 500]}\nmu: {uniform: [-3.5, -0.5]}\nvarsigma: {uniform: [0.5, 2]}\n"
DURATION = 2048
TINY = ["--preset", "tiny", "--data", "bundled:digits", "--batch", "64", "--warmup", "0", "--eval-samples", "64",
        "--eval-sigmas", "0.02,0.2,1,5"]

# Tune sweeps (minutes on 2 cores): the end-to-end tier, `make test-e2e`
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("local_ray"),
              pytest.mark.e2e]


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def starts(markers: Path) -> dict[str, list[str]]:
    return {p.name.removesuffix(".starts"): p.read_text().splitlines() for p in markers.glob("*.starts")}


class StartMarkers:
    """Trial hooks (`run_sweep(trial_hooks=...)`): one line per start of a trial in DIR/<trial>.starts."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def on_trial_start(self, trial_id: str, resumed_from) -> None:
        with open(Path(self.folder) / f"{trial_id}.starts", "a", encoding="utf-8") as f:
            f.write(f"{'resumed ' + resumed_from.name if resumed_from else 'fresh'}\n")


class InterruptOnce(tune.Callback):
    """After `ended` trials ended, the second result reported interrupts the sweep as ^C would (so one
    trial is cut off half-way with a checkpoint recorded), once per marker file: Tune restores the
    callback with the experiment, and the resumed sweep must run to the end."""

    def __init__(self, ended: int, marker: Path):
        self.limit, self.marker, self.ended, self.results_after = ended, str(marker), 0, 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.ended < self.limit or Path(self.marker).exists():
            return
        self.results_after += 1
        if self.results_after == 2:
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own handler: save the state, stop, return

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended += 1


def install(monkeypatch, **hooks) -> None:
    """Make `lossfloor sweep` run its sweeps with these hooks (the command imports run_sweep when it runs)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials run where tests/ is not
    monkeypatch.setattr(lossfloor.ray.sweep, "run_sweep", functools.partial(lossfloor.ray.sweep.run_sweep, **hooks))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 4-trial sweep: interrupted after two trials ended, then resumed to the end."""
    from ray.tune import ExperimentAnalysis

    root = tmp_path_factory.mktemp("sweep")
    (root / "space.yaml").write_text(SPACE)
    markers = root / "markers"
    markers.mkdir()
    out, uri = root / "out", f"sqlite:///{root / 'mlflow.db'}"
    argv = ["sweep", *TINY, "--space", str(root / "space.yaml"), "--trials", "4", "--images", str(DURATION),
            "--evals", "8", "--max-concurrent", "1", "--out", str(out), "--mlflow", "--tracking-uri", uri]
    with pytest.MonkeyPatch.context() as mp:
        install(mp, callbacks=[InterruptOnce(2, root / "interrupted")], trial_hooks=StartMarkers(markers))
        t0 = time.monotonic()
        rc1, _ = run_cli(argv)
        analysis = ExperimentAnalysis(str(out / "tune"))
        first = {t.trial_id: (t.status, dict(t.last_result or {})) for t in analysis.trials}
        starts1 = starts(markers)
        rc2, stdout = run_cli(argv)  # the same command resumes (the restored callback does not fire again)
        wall = time.monotonic() - t0
    return {"rc": (rc1, rc2), "first": first, "starts1": starts1, "starts": starts(markers), "out": out,
            "uri": uri, "argv": argv, "stdout": stdout, "wall": wall,
            "rows": pq.read_table(out / "results.parquet").to_pylist(),
            "best": json.loads((out / "best.json").read_text())}


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(swept):
    assert swept["rc"] == (130, 0)
    ended = [t for t, (status, _) in swept["first"].items() if status == "TERMINATED"]
    assert len(ended) == 2  # the interrupt came after the second trial ended
    for t in ended:  # started once, in the first run, never again
        assert swept["starts1"][t] == ["fresh"] and swept["starts"][t] == ["fresh"]
    rows = {r["trial_id"]: r for r in swept["rows"]}
    assert len(rows) == 5 and set(swept["starts"]) == set(rows)
    for t in ended:  # the second run kept their results
        assert rows[t]["objective"] == pytest.approx(swept["first"][t][1]["objective"], rel=1e-12)
    # the trial cut off half-way (at its second report, 512 images) continued from its first checkpoint
    running = [t for t, (status, _) in swept["first"].items() if status != "TERMINATED"]
    assert len(running) == 1
    cut = running[0]
    assert swept["starts1"][cut] == ["fresh"]
    assert swept["starts"][cut] == ["fresh", "resumed checkpoint_000000"]
    assert swept["first"][cut][1]["n_img"] == 512
    for t in set(rows) - set(ended) - {cut}:  # the others started once, in the second run
        assert t not in swept["starts1"] and swept["starts"][t] == ["fresh"]


def test_asha_stops_weak_trials_early_but_never_the_baseline(swept):
    rows = swept["rows"]
    baseline = [r for r in rows if r["is_baseline"]]
    assert len(baseline) == 1 and baseline[0]["schedule"] == "edm2"
    assert baseline[0]["n_img"] == DURATION and baseline[0]["status"] == "finished"
    stopped = [r for r in rows if r["stopped_early"]]
    assert stopped, rows
    history = pq.read_table(swept["out"] / "objective_history.parquet").to_pylist()
    for r in stopped:
        assert r["n_img"] < DURATION and r["status"] == "stopped" and r["schedule"] == "optimal"
        points = [p for p in history if p["trial_id"] == r["trial_id"]]
        assert max(p["n_img"] for p in points) == r["n_img"]
        assert points[-1]["objective"] == pytest.approx(r["objective"])
    # every trial reported the objective at each of its evaluations (every 256 images): what ASHA acts on
    for r in rows:
        n = sorted(p["n_img"] for p in history if p["trial_id"] == r["trial_id"])
        assert n == list(range(256, r["n_img"] + 1, 256))


def test_results_best_and_gain(swept):
    rows, best = swept["rows"], swept["best"]
    for r in rows:
        if not r["is_baseline"]:
            assert 5 <= r["w_max"] <= 500 and -3.5 <= r["mu"] <= -0.5 and 0.5 <= r["varsigma"] <= 2
    full = [r for r in rows if not r["is_baseline"] and r["status"] == "finished"]
    winner = min(full, key=lambda r: r["objective"])
    base = next(r for r in rows if r["is_baseline"])
    assert best["best"]["trial_id"] == winner["trial_id"]
    assert best["best"]["config"] == {k: winner[k] for k in ("w_max", "mu", "varsigma")}
    assert best["baseline"]["objective"] == base["objective"]
    assert best["gain"] == pytest.approx(base["objective"] - winner["objective"], rel=1e-12)
    assert best["relative_gain"] == pytest.approx(best["gain"] / base["objective"], rel=1e-12)
    assert best["stopped_early"] == sum(r["stopped_early"] for r in rows) and best["errors"] == 0
    for name in ("parallel_coordinates.html", "objective_vs_images.html"):
        text = (swept["out"] / name).read_text()
        assert is_offline_html(text)
    assert '"parcoords"' in (swept["out"] / "parallel_coordinates.html").read_text()
    assert f"gain over EDM2: {best['gain']:.5g}" in swept["stdout"]
    assert swept["wall"] < 240  # both runs; a guard against a sweep that silently reruns everything


def test_mlflow_parent_with_best_config_and_gain_and_one_child_per_trial(swept):
    c = client(swept["uri"])
    runs = c.search_runs([c.get_experiment_by_name("schedule-sweep").experiment_id])
    parents = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    assert len(parents) == 1  # the interrupted run logged nothing
    parent = parents[0]
    best = swept["best"]
    assert best["mlflow_run"] == parent.info.run_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["gain"] == pytest.approx(best["gain"])
    assert parent.data.metrics["baseline_objective"] == pytest.approx(best["baseline"]["objective"])
    assert parent.data.params["best.trial_id"] == best["best"]["trial_id"]
    for k, v in best["best"]["config"].items():
        assert float(parent.data.params[f"best.{k}"]) == pytest.approx(v)
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "best.json", "parallel_coordinates.html", "objective_vs_images.html",
            "space.yaml"} <= artifacts
    children = [r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
    assert len(children) == len(swept["rows"]) == 5
    assert sum(r.data.tags["lossfloor.baseline"] == "true" for r in children) == 1
    by_trial = {r.data.tags["lossfloor.trial_id"]: r for r in children}
    for row in swept["rows"]:
        child = by_trial[row["trial_id"]]
        history = c.get_metric_history(child.info.run_id, "objective")
        assert max(m.step for m in history) == row["n_img"]
        assert child.data.metrics["stopped_early"] == float(row["stopped_early"])


def test_rerunning_a_finished_sweep_reads_it_back_and_other_args_are_refused(swept, capsys):
    t0 = time.monotonic()
    rc, stdout = run_cli(swept["argv"])
    assert rc == 0 and time.monotonic() - t0 < 30 and "gain over EDM2" in stdout
    c = client(swept["uri"])
    runs = c.search_runs([c.get_experiment_by_name("schedule-sweep").experiment_id])
    assert sum(PARENT_RUN_TAG not in r.data.tags for r in runs) == 1  # not logged twice
    argv = [a if a != "4" else "5" for a in swept["argv"]]  # --trials 5
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep (differs in trials)" in err and err.count("\n") == 1


def test_optuna_search_multi_worker_trials_and_the_fd_objective(tmp_path, monkeypatch):
    (tmp_path / "space.yaml").write_text("w_max: {loguniform: [5, 500]}\nvarsigma: {uniform: [0.5, 2]}\n"
                                         "uniform_mix: 0.2\n")
    markers = tmp_path / "markers"
    markers.mkdir()
    install(monkeypatch, trial_hooks=StartMarkers(markers))
    rc, stdout = run_cli(["sweep", *TINY, "--space", str(tmp_path / "space.yaml"), "--trials", "1",
                          "--images", "256", "--evals", "2", "--search", "optuna", "--scheduler", "fifo",
                          "--objective", "fd", "--fd-samples", "32", "--fd-steps", "4",
                          "--workers", "2", "--cpus-per-worker", "0.5", "--out", str(tmp_path / "out")])
    assert rc == 0, stdout
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["schedule"] for r in rows] == ["edm2", "optimal"]
    trial = rows[1]
    assert 5 <= trial["w_max"] <= 500 and 0.5 <= trial["varsigma"] <= 2 and trial["uniform_mix"] == 0.2
    assert all(r["status"] == "finished" and r["n_img"] == 256 and r["objective"] > 0 for r in rows)
    # the Train callback forwarded the objective at both evaluations of each trial
    history = pq.read_table(tmp_path / "out" / "objective_history.parquet").to_pylist()
    assert sorted((p["trial_id"], p["n_img"]) for p in history) == sorted(
        (r["trial_id"], n) for r in rows for n in (128, 256))
    # each trial is a Ray Train run of its own, in OUT/trials/<trial id>, started once
    for r in rows:
        assert (tmp_path / "out" / "trials" / r["trial_id"] / "checkpoint-000000000256").is_dir()
    assert starts(markers) == {r["trial_id"]: ["fresh"] for r in rows}
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert best["objective"] == "fd" and best["gain"] == pytest.approx(rows[0]["objective"] - rows[1]["objective"])


@pytest.fixture(scope="module")
def jstar(tmp_path_factory):
    from lossfloor.data import load
    from lossfloor.diffusion import parse_sigma_grid
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table

    ds = load("bundled:digits")
    est = estimate(ds.samples, parse_sigma_grid("0.002:80:8"), EstimatorConfig(estimator="exact", queries_per_sample=1),
                   progress=False)
    path = tmp_path_factory.mktemp("jstar") / "jstar.parquet"
    write_table(build_table(est, target="x0", fingerprint=ds.fingerprint), path)
    return path


def test_bad_input_exits_2_with_one_line(tmp_path, jstar, capsys, monkeypatch):
    good = tmp_path / "space.yaml"
    good.write_text(SPACE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("w_max: {uniform: [10, 1]}\n")
    (tmp_path / "file").write_text("x")
    np.save(tmp_path / "x.npy", np.zeros((16, 1, 8, 8), np.float32))  # data that is not bundled: needs --j-star
    base = ["sweep", *TINY, "--j-star", str(jstar), "--trials", "2", "--images", "256"]
    cases = [
        ([*base, "--space", str(bad), "--out", str(tmp_path / "o")], f"{bad}: w_max: uniform needs low < high"),
        ([*base, "--space", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], "nope.yaml: search space"),
        ([*base, "--space", str(good), "--gpus-per-worker", "0.25", "--workers", "2", "--out",
          str(tmp_path / "o")], "--gpus-per-worker: 0.25 GPUs cannot be given to each of 2 workers"),
        ([*base, "--space", str(good), "--gpus-per-worker", "1", "--out", str(tmp_path / "o")],
         "a trial needs 1 GPUs, the Ray cluster has 0"),
        ([*base, "--space", str(good), "--trials", "0", "--out", str(tmp_path / "o")], "--trials: expected"),
        ([*base, "--space", str(good), "--fd-weights", str(tmp_path / "file"), "--out", str(tmp_path / "o")],
         "--fd-weights: only with --objective fd"),
        ([*base, "--space", str(good), "--out", str(tmp_path / "file")], "exists and is not a folder"),
        ([*base, "--space", str(good), "--j-star", str(tmp_path / "no.parquet"), "--out", str(tmp_path / "o")],
         "--j-star"),
        (["sweep", *TINY, "--data", str(tmp_path / "x.npy"), "--space", str(good), "--trials", "1", "--out",
          str(tmp_path / "o")], "--j-star: needed for this data"),
        (["sweep", *TINY, "--data", str(tmp_path / "missing.npy"), "--space", str(good), "--trials", "1", "--out",
          str(tmp_path / "o")], "missing.npy: no such file"),  # the data first, not a missing --j-star
        ([*base, "--space", str(good), "--preset", "tiny32", "--out", str(tmp_path / "o")], "expects (3, 32, 32)"),
        ([*base, "--space", str(good), "--workers", "3", "--out", str(tmp_path / "o")], "--batch: 64"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o").exists()  # nothing written
    # --search optuna without optuna installed: a clear error, not an ImportError
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main([*base, "--space", str(good), "--search", "optuna", "--out", str(tmp_path / "o")]) == 2
    assert "--search optuna: optuna is not installed" in capsys.readouterr().err


def test_the_study_plans_with_no_arguments(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("schedule_sweep", REPO / "studies" / "schedule_sweep.py")
    study = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = study
    spec.loader.exec_module(study)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert study.main(["--dry-run", "--out", str(tmp_path / "s")]) == 0
    text = out.getvalue()
    assert "EDM2 baseline + 8 optimal-loss trials" in text and "optimal_loss.yaml" in text
    assert "16384 images" in text and not (tmp_path / "s").exists()
