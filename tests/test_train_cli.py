"""`lossfloor train` (local engine): the run folder, the printed summary, the MLflow run, resuming a
finished or lengthened run, the `--engine ray` plumbing, and bad input (exit 2, one line, nothing written).

Ray itself is tested in test_ray_train.py; here `--engine ray` runs against a stand-in for train_on_ray.
"""

import dataclasses
import json
import sys
import types

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cli_run import cli
from lossfloor.cli import main
from lossfloor.data import load
from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table
from lossfloor.models import get_preset
from lossfloor.train import OptimalLossSchedule, TrainConfig, forward_flops, train
from lossfloor.train.checkpoint import list_checkpoints, load_checkpoint

EVAL = ["--eval-sigmas", "0.05,0.5,5", "--eval-samples", "32"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def jstar(tmp_path_factory):
    """J* of the digits by the exact estimator (Eq. 9), x0 units."""
    digits = load("bundled:digits")
    est = estimate(digits.samples, np.geomspace(0.01, 20, 6), EstimatorConfig(estimator="exact", queries_per_sample=1),
                   progress=False)
    return str(write_table(build_table(est, fingerprint=digits.fingerprint),
                           tmp_path_factory.mktemp("jstar") / "jstar.parquet"))


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def train_args(out, *extra):
    return ["train", "--preset", "tiny", "--data", "bundled:digits", "--batch", "32", *EVAL, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, jstar, mlflow_uri):
    """One optimal-loss run of 64 images (2 steps, 2 evaluations), logged to MLflow; its folder."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    try:
        code = main(train_args(out, "--images", "64", "--eval-every", "32", "--schedule", "optimal-loss",
                               "--j-star", jstar, "--mlflow", "--samples", "16", "--json", "--seed", "3"))
    finally:
        mp.undo()
    assert code == 0
    return out


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def test_run_folder_summary_and_flops(finished, jstar):
    out = finished
    assert [n for n, _ in list_checkpoints(out)] == [32, 64]
    state = load_checkpoint(out / "checkpoint-000000000064")
    assert state["config"]["schedule"]["kind"] == "optimal" and state["config"]["jstar"] == jstar
    assert state["config"]["seed"] == 3 and state["config"]["duration_n_img"] == 64
    assert state["config"]["conditional"] is False  # the J* table is the unconditional floor: no labels by default
    curve = pq.read_table(out / "loss_curve.parquet").to_pylist()
    assert [(r["images"], r["sigma"]) for r in curve] == [(i, s) for i in (32, 64) for s in (0.05, 0.5, 5.0, None)]
    for r in curve:
        if r["sigma"] is not None:
            assert r["gap"] == pytest.approx(r["loss"] - r["j_star"]) and r["gap"] > 0  # Theorem 1
    log = pq.read_table(out / "train_log.parquet").to_pylist()
    assert [r["step"] for r in log] == [1, 2]
    tiny = get_preset("tiny")
    fwd = forward_flops(dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, label_dim=0)))
    assert log[-1]["flops"] == pytest.approx(3 * fwd * 64)


def test_rerun_of_a_finished_run_does_nothing_and_prints_the_gap_table(finished, capsys):
    before = (finished / "checkpoint-000000000064" / "state.pt").stat().st_mtime_ns
    code, out, err = cli(train_args(finished, "--images", "64", "--eval-every", "32", "--schedule", "optimal-loss",
                                    "--j-star", str(load_checkpoint(finished / "checkpoint-000000000064")["config"]["jstar"]),
                                    "--seed", "3"), capsys)
    assert code == 0, err
    assert (finished / "checkpoint-000000000064" / "state.pt").stat().st_mtime_ns == before
    lines = out.splitlines()
    assert "64 images in 2 steps" in lines[0] and "tiny" in lines[0]
    # which loss is which: the training objective of the last steps, the evaluation's weighted total
    assert lines[1].startswith("training: loss ") and "σ drawn by the schedule" in lines[1]
    assert lines[2].startswith("evaluation at 64 images: weighted total ") and "3 evaluation σ below" in lines[2]
    assert lines[3].split() == ["sigma", "loss", "j_star", "gap", "gap/loss"]
    assert [float(line.split()[0]) for line in lines[4:7]] == [0.05, 0.5, 5.0]
    assert lines[7].startswith("FLOPs: ") and f"checkpoint {finished / 'checkpoint-000000000064'}" in out
    assert "loss_curve.parquet" in out and "train_log.parquet" in out


def test_mlflow_run_holds_params_per_step_loss_per_sigma_gap_flops_and_artifacts(finished, mlflow_uri, tmp_path):
    from lossfloor.tracking import client

    c = client(mlflow_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("optimal-loss").experiment_id])
    assert run.info.status == "FINISHED"
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert (p["preset"], p["process"], p["data"], p["engine"], p["seed"]) == ("tiny", "edm", "bundled:digits", "local", "3")
    assert p["resolved.batch_n_img"] == "32" and p["resolved.duration_n_img"] == "64"
    assert json.loads(p["schedule"])["kind"] == "optimal" and p["model"] == "tiny"
    assert tags["lossfloor.kind"] == "train" and tags["checkpoint"] == str(finished / "checkpoint-000000000064")
    # the run spans the training itself (logged after it, with its start and end), in a model-development experiment
    meta = pq.read_schema(finished / "loss_curve.parquet").metadata
    assert run.info.start_time == int(float(meta[b"started_at"]) * 1000)
    assert run.info.end_time > run.info.start_time  # the end: when the training last wrote its tables
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert json.loads(tags["checkpoints"]) == [str(finished / "checkpoint-000000000032"), tags["checkpoint"]]
    assert run.info.run_name == tags["lossfloor.run"]

    curve = pq.read_table(finished / "loss_curve.parquet").to_pylist()
    log = pq.read_table(finished / "train_log.parquet").to_pylist()
    hist = lambda name: [(x.step, x.value) for x in sorted(c.get_metric_history(run.info.run_id, name),  # noqa: E731
                                                           key=lambda x: x.step)]
    assert hist("train/loss") == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert hist("train/gap") == [(r["step"], pytest.approx(r["gap"])) for r in log]
    gaps = [(r["step"], pytest.approx(r["gap"])) for r in curve if r["sigma"] == 0.5]
    assert hist("eval/gap/sigma_0.5") == gaps and len(gaps) == 2
    assert [v for _, v in hist("final/sigma")] == [0.05, 0.5, 5.0]
    assert [v for _, v in hist("final/gap")] == pytest.approx([r["gap"] for r in curve[4:7]])
    assert m["training_flops"] == pytest.approx(log[-1]["flops"]) and m["n_img"] == 64
    tiny = get_preset("tiny")  # unconditional: the J* table is the unconditional floor
    assert m["forward_flops"] == pytest.approx(forward_flops(dataclasses.replace(tiny.unet, label_dim=0)))

    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"loss_curve.parquet", "train_log.parquet", "config.json", "loss_curve.html", "samples.png"} <= names
    png = c.download_artifacts(run.info.run_id, "samples.png", str(tmp_path))
    from PIL import Image

    assert Image.open(png).size == (4 * 33 - 1, 4 * 33 - 1)  # 16 samples of 8x8 x4 with 1-pixel gaps


def test_longer_images_continue_the_run_to_the_plain_result(finished, tmp_path, capsys):
    # a copy of the finished 64-image run, continued to 96 images, equals a plain 96-image run
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    jstar = load_checkpoint(out / "checkpoint-000000000064")["config"]["jstar"]
    args = train_args(out, "--images", "96", "--eval-every", "32", "--schedule", "optimal-loss", "--j-star", jstar,
                      "--seed", "3", "--json")
    code, stdout, err = cli(args, capsys)
    assert code == 0, err
    s = last_json(stdout)
    assert (s["n_img"], s["steps"]) == (96, 3) and s["checkpoint"].endswith("checkpoint-000000000096")
    plain = train(TrainConfig(preset="tiny", batch_n_img=32, duration_n_img=96, eval_every_n_img=32, jstar=jstar,
                              schedule=OptimalLossSchedule(), eval_sigmas=(0.05, 0.5, 5.0), eval_n_samples=32, conditional=False,
                              seed=3), load("bundled:digits"))
    state = load_checkpoint(s["checkpoint"])
    for k, v in plain.model_state.items():
        assert torch.equal(state["net"][k], v), k
    assert [r["sigma"] for r in s["per_sigma"]] == [0.05, 0.5, 5.0]
    assert s["per_sigma"][1]["gap"] == pytest.approx(plain.loss_curve[-3]["gap"])


def test_ray_engine_arguments_reach_train_on_ray(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_train_on_ray(config, data_source, **kw):
        calls.append((config, data_source, kw))
        folder = kw["storage_path"] / kw["name"]
        res = train(config, load(data_source), checkpoint_dir=folder)
        return types.SimpleNamespace(metrics={"n_img": res.n_img}, checkpoint=str(res.checkpoint))

    monkeypatch.setitem(sys.modules, "lossfloor.ray.train", types.SimpleNamespace(train_on_ray=fake_train_on_ray))
    out = tmp_path / "r"
    code, stdout, err = cli(train_args(out, "--images", "32", "--engine", "ray", "--workers", "2",
                                       "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--max-failures", "3",
                                       "--json"), capsys)
    assert code == 0, err
    ((config, source, kw),) = calls
    assert source == "bundled:digits" and config.batch_n_img == 32 and config.duration_n_img == 32
    assert kw == {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1.0, "storage_path": tmp_path,
                  "name": "r", "max_failures": 3, "address": None, "resume": True}
    s = last_json(stdout)
    assert s["engine"] == "ray" and s["n_img"] == 32 and s["checkpoint"] == str(out / "checkpoint-000000000032")


# --- Bad input ---------------------------------------------------------------------------------------


def bad_cases(tmp_path, jstar):
    not_a_table = tmp_path / "t.parquet"
    not_a_table.write_text("nope")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    other = tmp_path / "other.parquet"  # J* of other data (the digits' first 500 samples)
    part = load("bundled:digits", max_samples=500)
    est = estimate(part.samples, np.geomspace(0.01, 20, 4), EstimatorConfig(estimator="exact"), progress=False)
    write_table(build_table(est, fingerprint=part.fingerprint), other)
    posterior = tmp_path / "posterior.parquet"  # a posterior-latents floor for mean training
    write_table(build_table(est, fingerprint=part.fingerprint, latents="posterior"), posterior)
    old = tmp_path / "old"
    (old / "checkpoint-000000000032").mkdir(parents=True)
    (old / "checkpoint-000000000032" / "state.pt").write_bytes(b"")
    return {
        "optimal-loss without --j-star": (["--schedule", "optimal-loss"], "--j-star"),
        "missing J* table": (["--j-star", str(tmp_path / "none.parquet")], "--j-star"),
        "corrupt J* table": (["--j-star", str(not_a_table)], "--j-star"),
        "unknown preset": (["--preset", "huge"], "--preset"),
        "images below batch": (["--images", "16"], "--images"),
        "bad data path": (["--data", str(tmp_path / "nope.npy")], "nope.npy"),
        "data of another shape": (["--preset", "tiny32"], "expects"),
        "eval subset too big": (["--eval-samples", "5000"], "--eval-samples"),
        "bad eval sigmas": (["--eval-sigmas", "0,1"], "--eval-sigmas"),
        "zero batch": (["--batch", "0"], "--batch"),
        "negative lr": (["--lr", "-1"], "--lr"),
        "ray flag on local": (["--workers", "2"], "--workers"),
        "device with ray": (["--engine", "ray", "--device", "cuda"], "--device"),
        "batch over workers": (["--engine", "ray", "--workers", "3"], "--batch"),
        "fp16 without gpus": (["--engine", "ray", "--precision", "fp16"], "fp16"),
        "bad samples": (["--samples", "many"], "--samples"),
        "out is a file": (["--out", str(a_file)], "--out"),
        "no-resume over checkpoints": (["--out", str(old), "--no-resume"], "--no-resume"),
        "unknown schedule": (["--schedule", "cosine"], "--schedule"),
        "J* table of other data": (["--j-star", str(other)], "--j-star"),
        "J* table of the posterior": (["--j-star", str(posterior)], "latents"),
        "unknown latents": (["--latents", "sample"], "--latents"),
        "posterior of the digits": (["--latents", "posterior"], "--latents posterior"),
    }


CASES = [
    "optimal-loss without --j-star", "missing J* table", "corrupt J* table", "unknown preset", "images below batch",
    "bad data path", "data of another shape", "eval subset too big", "bad eval sigmas", "zero batch", "negative lr",
    "ray flag on local", "device with ray", "batch over workers", "fp16 without gpus", "bad samples", "out is a file",
    "no-resume over checkpoints", "unknown schedule", "J* table of other data", "J* table of the posterior",
    "unknown latents", "posterior of the digits",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, jstar, capsys):
    extra, needle = bad_cases(tmp_path, jstar)[case]
    argv = train_args(tmp_path / "out", "--images", "64", *extra)
    code, out, err = cli(argv, capsys)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


def test_resume_with_another_config_is_refused_naming_the_field(finished, capsys):
    jstar = load_checkpoint(finished / "checkpoint-000000000064")["config"]["jstar"]
    code, _, err = cli(train_args(finished, "--images", "64", "--eval-every", "32", "--schedule", "optimal-loss",
                                  "--j-star", jstar, "--seed", "3", "--lr", "0.02"), capsys)
    assert code == 2 and "lr_ref" in err and err.count("\n") == 1


def test_resume_with_the_presets_own_lr_given_continues_the_same_run(tmp_path, capsys):
    # lr_ref left to the preset, then given as the preset's value: the same run (issue 19)
    out = tmp_path / "r"
    code, stdout, err = cli(train_args(out, "--images", "32", "--json"), capsys)
    assert code == 0, err
    first = last_json(stdout)
    code, stdout, err = cli(train_args(out, "--images", "64", "--lr", str(get_preset("tiny").lr_ref), "--json"), capsys)
    assert code == 0, err
    s = last_json(stdout)
    assert (s["n_img"], s["run"]) == (64, first["run"])
    assert {r["run"] for r in pq.read_table(out / "loss_curve.parquet").to_pylist()} == {first["run"]}


def test_preset_auto_sizes_the_tiny_unet_for_the_data():
    from lossfloor.models import sized_preset

    tiny = get_preset("tiny")
    assert sized_preset((1, 8, 8)) == dataclasses.replace(tiny, name="auto-8x8x1",
                                                          unet=dataclasses.replace(tiny.unet, label_dim=0))
    for shape, resolutions, attention in (((3, 16, 16), (16, 8, 4), (4,)), ((3, 12, 12), (12, 6), (6,)),
                                          ((2, 7, 7), (7,), (7,)), ((3, 256, 256), (256, 128, 64, 32), ())):
        unet = sized_preset(shape).unet
        assert (unet.img_channels, unet.resolutions, unet.attn_resolutions) == (shape[0], resolutions, attention)


def test_preset_auto_trains_ones_own_16x16_rgb_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    argv = ["train", "--data", str(folder), "--images", "32", "--batch", "32", "--eval-samples", "8",
            "--eval-sigmas", "0.5", "--out", str(tmp_path / "run"), "--json"]
    code, _, err = cli(argv, capsys)  # tiny is 8x8x1: the error names the shape and the flag
    assert code == 2 and "(3, 16, 16)" in err and "--preset auto" in err, err
    code, stdout, err = cli([*argv, "--preset", "auto"], capsys)
    assert code == 0, err
    s = last_json(stdout)
    assert (s["model"], s["n_img"], s["steps"]) == ("auto-16x16x3", 32, 1)
    assert np.isfinite(s["train_loss"]) and np.isfinite(s["eval_total"])
