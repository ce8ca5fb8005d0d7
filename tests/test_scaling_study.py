"""studies/scaling_imagenet512.py: --dry-run, a tiny in-process run and its rerun (finished stages are
skipped), and a submission as a Ray job to a local head started here (`ray job submit` with
cluster/runtime_env.yaml, results read back from MLflow)."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lossfloor.pages.html import is_offline_html
from lossfloor.tracking import PARENT_RUN_TAG, client
from ray_head import RAY, job_env, ray_head

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "studies" / "scaling_imagenet512.py"
TINY = ["--smoke-budget", "tiny"]


def _study():
    spec = importlib.util.spec_from_file_location("scaling_imagenet512", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_store(uri: str, n_parents: int = 1, quality: bool = False) -> list[dict]:
    """Every study parent FINISHED with FINISHED children: one estimate, >= 2 train, one fit (and one quality
    with `quality`), with the
    artifacts of the dashboard contract; the parent holds dashboard.html. Returns per parent its kids."""
    c = client(uri)
    exp = c.get_experiment_by_name("scaling")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    assert len(parents) == n_parents and all(p.info.run_name == "scaling-smoke" for p in parents)
    assert all(r.info.status == "FINISHED" for r in runs)
    out = []
    for parent in parents:
        kids = [r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
        by_stage: dict[str, list] = {}
        for r in kids:
            by_stage.setdefault(r.data.tags.get("lossfloor.stage"), []).append(r)
        assert sorted(by_stage) == ["estimate", "fit", *(["quality"] if quality else []), "train"]
        assert len(by_stage["estimate"]) == 1 and len(by_stage["fit"]) == 1 and len(by_stage["train"]) >= 2
        artifacts = {s: [{a.path for a in c.list_artifacts(r.info.run_id)} for r in rs] for s, rs in by_stage.items()}
        assert "jstar.parquet" in artifacts["estimate"][0] and "fits.json" in artifacts["fit"][0]
        assert all("loss_curve.parquet" in a for a in artifacts["train"])
        assert {"dashboard.html", "summary.json"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
        out.append(by_stage)
    return out


def _check_outputs(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert is_offline_html(Path(summary["dashboard"]).read_text(encoding="utf-8"))
    fits = json.loads((Path(summary["stages"]["fit"]["dir"]) / "fits.json").read_text(encoding="utf-8"))
    assert set(fits) == {"total", *(f"sigma={s:.6g}" for s in summary["fit_sigmas"])}
    assert all(f["raw"]["abs_rho"] is not None and f["n_models"] == 2 for f in fits.values())
    return summary


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    rc = _study().main(["--dry-run", "--out", str(out), "--tracking-uri", f"sqlite:///{db}"])
    text = capsys.readouterr().out
    assert rc == 0
    for word in ("bundled:digits", "N=1797", "estimate", "tiny-c8", "tiny-c16", "tiny-c32", "train FLOPs",
                 "the class-conditional floor", "class-conditional, batch",  # the digits are labelled
                 "schedule edm2", "bootstrap 100", "devices: local engine", "dashboard", str(out)):
        assert word in text, word
    assert not out.exists() and not db.exists()


def test_dry_run_imagenet512_shows_edm2_budgets(tmp_path, capsys):
    rc = _study().main(["--dry-run", "--preset", "imagenet512", "--budget-scale", "0.5", "--engine", "ray",
                        "--gpus-per-worker", "1", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "img512-xs" in text and "img512-xxl" in text and "1,073,741,824" in text  # 2048Mi x 0.5
    assert "1 GPU" in text and not (tmp_path / "out").exists()
    # ImageNet is labelled: class-conditional models (as EDM2's) and the class-conditional floor, by default
    assert "2 estimate: the class-conditional floor" in text and "class-conditional, batch" in text
    rc = _study().main(["--dry-run", "--preset", "imagenet512", "--unconditional", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert rc == 0 and "knn with L=128" in text and "unconditional, batch" in text


def test_bad_input_exits_2(tmp_path, capsys):
    assert _study().main(["--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.npy" in capsys.readouterr().err
    assert _study().main(["--dry-run", "--budget-scale", "0"]) == 2


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny in-process run (local engine): (out, tracking URI)."""
    tmp = tmp_path_factory.mktemp("scaling")
    out, uri = tmp / "out", f"sqlite:///{tmp}/mlflow.db"
    assert _study().main([*TINY, "--engine", "local", "--out", str(out), "--tracking-uri", uri]) == 0
    return out, uri


def test_tiny_run_in_process(first_run):
    out, uri = first_run
    (kids,) = _check_store(uri)
    summary = _check_outputs(out)
    for run in kids["train"]:  # the last total under the learned weighting, as the train child's metric
        stage = summary["stages"][f"train-{run.data.tags['lossfloor.model']}"]
        last = [r for r in pq.read_table(Path(stage["dir"]) / "loss_curve.parquet").to_pylist() if r["sigma"] is None][-1]
        assert run.data.metrics["eval/total_learned"] == pytest.approx(last["total_learned"], rel=1e-12)
    assert not any(s["skipped"] for s in summary["stages"].values())
    for name, stage in summary["stages"].items():
        if name.startswith("train-"):  # J* of the total loss = the loop's own total - total gap
            rows = [r for r in pq.read_table(Path(stage["dir"]) / "loss_curve.parquet").to_pylist()
                    if r["sigma"] is None]
            assert all(r["loss"] - r["gap"] == pytest.approx(summary["total_j_star"][0], rel=1e-9) for r in rows)
            assert len(rows) == 4 and rows[-1]["flops"] > rows[0]["flops"] > 0
            assert all(r["total_learned"] is not None for r in rows)  # EDM2's schedule trains the head
    learned = json.loads((Path(summary["stages"]["fit"]["dir"]) / "fits_learned.json").read_text(encoding="utf-8"))
    assert learned["total_learned"]["raw"]["abs_rho"] is not None and learned["total_learned"]["n_models"] == 2
    assert "total_learned" in [r["quantity"] for r in summary["rho"]]


def test_rerun_skips_finished_stages(first_run, caplog):
    out, uri = first_run
    markers = {p: p.stat().st_mtime_ns for p in out.glob("*/DONE.json")}
    assert len(markers) == 4  # estimate, 2 x train, fit
    with caplog.at_level(logging.INFO, logger="scaling_imagenet512"):
        assert _study().main([*TINY, "--engine", "local", "--out", str(out), "--tracking-uri", uri]) == 0
    assert "stage train: 0 model(s) to train, 2 finished earlier" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/DONE.json")} == markers  # nothing redone
    summary = _check_outputs(out)
    assert all(s["skipped"] for s in summary["stages"].values())
    kids = _check_store(uri, n_parents=1)  # the rerun continues the same parent and keeps its children
    assert sorted(r.data.tags["lossfloor.cached"] for k in kids for rs in k.values() for r in rs) == ["false"] * 4


def test_given_j_star_table_replaces_the_estimate(first_run, tmp_path, capsys):
    out, _ = first_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    given = Path(summary["stages"]["estimate"]["dir"]) / "jstar.parquet"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # a table of other data (here: its fingerprint changed) is refused before any work
    bad = pq.read_table(given)
    bad = bad.set_column(bad.schema.get_field_index("dataset_fingerprint"), "dataset_fingerprint",
                         pa.array(["sha256:other"] * len(bad)))
    pq.write_table(bad, tmp_path / "other.parquet")
    argv = [*TINY, "--engine", "local", "--tracking-uri", uri]
    assert _study().main([*argv, "--j-star", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "x")]) == 2
    assert "--j-star" in capsys.readouterr().err and not (tmp_path / "x").exists()  # nothing written

    assert _study().main([*argv, "--j-star", str(given), "--out", str(tmp_path / "o")]) == 0
    again = _check_outputs(tmp_path / "o")
    stage = again["stages"]["estimate"]
    assert json.loads((Path(stage["dir"]) / "DONE.json").read_text(encoding="utf-8"))["result"]["given"] == str(given)
    assert pq.read_table(Path(stage["dir"]) / "jstar.parquet").equals(pq.read_table(given))
    # the same J*, the same models and seed: the same curves and fits as the run that estimated it
    assert again["total_j_star"] == summary["total_j_star"] and again["fit_sigmas"] == summary["fit_sigmas"]
    fits = [json.loads((Path(s["stages"]["fit"]["dir"]) / "fits.json").read_text(encoding="utf-8"))
            for s in (summary, again)]
    assert fits[0]["total"]["raw"]["alpha"] == pytest.approx(fits[1]["total"]["raw"]["alpha"], rel=1e-9)


def test_posthoc_ema_curves_are_fitted_in_a_new_fit_stage(first_run, tmp_path):
    """--ema posthoc:0.1 on the finished ladder: estimate and train are reused, the fit is a new stage whose
    curves (at every evaluation point, from the snapshots up to it) differ from the raw ones and, at the
    final point, equal a direct evaluation of the EMA the loop tracked at that width (0.1 is tracked, so
    its reconstruction must be that EMA itself)."""
    import shutil

    import numpy as np
    import torch

    from lossfloor.data import load
    from lossfloor.diagnose.measure import evaluation_subset, local_losses
    from lossfloor.diagnose.models import load_model
    from lossfloor.tracking.artifacts import read_study
    from lossfloor.train.evaluation import quadrature_weights

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    shutil.copytree(first_run[0], out)
    raw = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(raw["ema"].values()) == {"raw"}  # the smoke ladder's default: EDM2 reports no width for it
    assert _study().main([*TINY, "--engine", "local", "--ema", "posthoc:0.1", "--out", str(out),
                          "--tracking-uri", uri]) == 0
    summary = _check_outputs(out)
    assert summary["ema"] == {"tiny-c4": "posthoc:0.1", "tiny-c8": "posthoc:0.1"} and summary["ema_seconds"] > 0
    assert [k for k, s in summary["stages"].items() if not s["skipped"]] == ["fit"]
    assert summary["stages"]["fit"]["dir"] != raw["stages"]["fit"]["dir"]  # a changed --ema: a new stage

    fitted = pq.read_table(Path(summary["stages"]["fit"]["dir"]) / "loss_curve.parquet").to_pylist()
    loop = {}
    for name, stage in summary["stages"].items():
        if name.startswith("train-"):
            for r in pq.read_table(Path(stage["dir"]) / "loss_curve.parquet").to_pylist():
                loop[r["model"], r["images"], r["sigma"]] = r
    assert len(fitted) == len(loop)  # every evaluation point has its snapshot
    for r in fitted:
        same = loop[r["model"], r["images"], r["sigma"]]
        assert r["loss"] != same["loss"] and r["flops"] == same["flops"]
        assert r["j_star"] == pytest.approx(same["j_star"], rel=1e-12)

    # the final point, evaluated directly: the tracked EMA 0.1 of the final checkpoint (no snapshots read)
    data = load("bundled:digits", max_samples=600)
    for name, stage in summary["stages"].items():
        if not name.startswith("train-"):
            continue
        model = load_model(stage["dir"], ema="0.1")
        rows = [r for r in fitted if r["model"] == model.name]
        last = max(r["images"] for r in rows)
        per_sigma = sorted((r for r in rows if r["images"] == last and r["sigma"] is not None), key=lambda r: r["sigma"])
        sigmas = np.array([r["sigma"] for r in per_sigma])
        idx = torch.from_numpy(evaluation_subset(len(data), 64, 0))
        x0, labels = torch.as_tensor(data.samples)[idx], torch.as_tensor(data.labels)[idx]  # conditional models
        loss, _ = local_losses(model, x0, labels, sigmas, seed=0, batch=64, device="cpu")
        np.testing.assert_allclose([r["loss"] for r in per_sigma], loss, rtol=1e-5)
        coef = quadrature_weights(sigmas, model.weighting.density) * model.weighting.weight(
            torch.as_tensor(sigmas)).numpy()
        total = next(r for r in rows if r["images"] == last and r["sigma"] is None)
        assert total["loss"] == pytest.approx(float(np.sum(coef * loss)), rel=1e-5)

    # MLflow: the choice is a param of the study and of its fit, whose curves the dashboard reads
    study = read_study(experiment="scaling", tracking_uri=uri)
    assert study.ema == "posthoc:0.1" and study.about()["weights (EMA)"] == "posthoc:0.1"
    assert sorted(study.curves.column("loss").to_pylist()) == sorted(r["loss"] for r in fitted)
    fit_run = client(uri).get_run(study.runs["fit"][0])
    assert fit_run.data.params["ema"] == "posthoc:0.1"
QUALITY = ["--features", "pixels:8", "--fd-samples", "64", "--fd-seeds", "2"]
FEW = ["--features", "pixels:8", "--fd-samples", "32", "--fd-seeds", "2"]


def test_sample_quality_stage_is_lossfloor_evaluate(first_run, tmp_path, capsys, caplog):
    """--features on the finished ladder: estimate, train and fit are reused, the quality stage runs once, its
    numbers are those of `lossfloor evaluate` on each model's final checkpoint with the same settings (the same
    seeds: the same samples), they reach MLflow and the dashboard, and a rerun skips the stage."""
    import shutil

    import numpy as np

    from lossfloor.cli import main as cli
    from lossfloor.tracking.artifacts import read_study

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    shutil.copytree(first_run[0], out)
    argv = [*TINY, "--engine", "local", *QUALITY, "--out", str(out), "--tracking-uri", uri]
    assert _study().main(argv) == 0
    assert "sample quality (mean ± spread over seeds" in capsys.readouterr().out
    summary = _check_outputs(out)
    assert [k for k, s in summary["stages"].items() if not s["skipped"]] == ["quality"]
    stage = Path(summary["stages"]["quality"]["dir"])
    quality = summary["quality"]
    assert quality["metrics"] == ["fd"] and quality["n_samples"] == 64 and quality["seeds"] == 2
    assert sorted(quality["models"]) == ["tiny-c4", "tiny-c8"]

    # the same job from the command line: the reference statistics, then each model's final checkpoint
    ref = tmp_path / "digits.stats.npz"
    assert cli(["evaluate", "--reference", "--data", "bundled:digits", "--features", "pixels:8", "--out", str(ref)]) == 0
    with np.load(ref) as a, np.load(stage / "reference.stats.npz") as b:
        assert np.array_equal(a["mu_fd"], b["mu_fd"]) and np.array_equal(a["cov_fd"], b["cov_fd"])
    for model, row in quality["models"].items():
        train = Path(summary["stages"][f"train-{model}"]["dir"])
        capsys.readouterr()
        assert cli(["evaluate", "--model", str(train), "--reference-stats", str(ref), "--features", "pixels:8",
                    "--n-samples", "64", "--seeds", "2", "--ema", "raw", "--out", str(tmp_path / model), "--json"]) == 0
        direct = json.loads(capsys.readouterr().out)
        assert row["fd"]["per_seed"] == direct["fd"]["per_seed"] and row["fd"]["mean"] == direct["fd"]["mean"]
        assert row["fd"]["std"] == pytest.approx(np.std(direct["fd"]["per_seed"], ddof=1), rel=1e-12)
        assert row["fd"]["std"] > 0
        totals = [r for r in pq.read_table(train / "loss_curve.parquet").to_pylist() if r["sigma"] is None]
        assert row["flops"] == totals[-1]["flops"] and row["images"] == totals[-1]["images"]
        assert (train / f"checkpoint-{row['images']:012d}").is_dir()  # the checkpoint evaluated is at that point
    assert quality["models"]["tiny-c8"]["fd"]["mean"] < quality["models"]["tiny-c4"]["fd"]["mean"]

    # MLflow: the quality child (metrics, quality.json, the statistics files); the dashboard draws it
    c = client(uri)
    study = read_study(experiment="scaling", tracking_uri=uri)
    assert study.quality == quality
    (run_id,) = study.runs["quality"]
    run = c.get_run(run_id)
    assert run.data.tags["lossfloor.stage"] == "quality"
    assert run.data.metrics["fd/tiny-c4"] == quality["models"]["tiny-c4"]["fd"]["mean"]
    assert {a.path for a in c.list_artifacts(run_id)} >= {"quality.json", "reference.stats.npz", "stats"}
    assert {a.path for a in c.list_artifacts(run_id, "stats/tiny-c8")} == {
        "stats/tiny-c8/samples-seed0.stats.npz", "stats/tiny-c8/samples-seed1.stats.npz"}
    assert "<h2>Sample quality vs training FLOPs</h2>" in Path(summary["dashboard"]).read_text(encoding="utf-8")

    # a rerun skips it, and keeps its child run
    marker = (stage / "DONE.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="scaling_imagenet512"):
        assert _study().main(argv) == 0
    assert f"stage quality: finished earlier in {stage}, skipped" in caplog.text
    assert (stage / "DONE.json").stat().st_mtime_ns == marker
    assert read_study(experiment="scaling", tracking_uri=uri).runs["quality"] == (run_id,)

    # a stage stopped after its evaluations, before DONE.json: they are read back, not sampled again
    again = tmp_path / "again"
    shutil.copytree(out, again)
    moved = Path(str(stage).replace(str(out), str(again)))
    (moved / "DONE.json").unlink()
    (moved / "quality.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scaling_imagenet512"):
        assert _study().main([*argv[:-4], "--out", str(again), "--tracking-uri", f"sqlite:///{tmp_path}/again.db"]) == 0
    assert "quality tiny-c8: evaluated before the stage was interrupted" in caplog.text
    assert json.loads((moved / "quality.json").read_text(encoding="utf-8")) == quality


def test_sample_quality_of_a_latent_ladder_is_lossfloor_evaluate_with_the_vae(tmp_path, capsys, one_thread):
    """Latent data (an EDM2-layout set of (4, 8, 8) latents with its own statistics, a tiny random VAE that
    decodes them to (3, 16, 16)): the smoke ladder trains on them, and the quality stage's numbers are those of
    `lossfloor evaluate --vae --latent-stats` (the set's statistics, the default) on each final checkpoint
    against the given --reference-stats of the images; the VAE enters the stage's key."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from lossfloor.cli import main as cli
    from lossfloor.data import Dataset
    from lossfloor.data.edm2 import LatentStats
    from lossfloor.data.latent_sets import write_edm2
    from lossfloor.train.metrics import feature_extractors
    from lossfloor.train.quality import reference_statistics, write_reference

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "vae", safe_serialization=True)
    rng = np.random.default_rng(0)
    mean, std = (1.0, -2.0, 0.5, 3.0), (2.0, 1.0, 3.0, 0.5)
    m, s = np.array(mean)[:, None, None], np.array(std)[:, None, None]
    raw = np.concatenate([m + s * rng.standard_normal((128, 4, 8, 8)), np.full((128, 4, 8, 8), 0.1)], axis=1)
    (tmp_path / "latents").mkdir()
    write_edm2(tmp_path / "latents", lambda: iter([raw.astype(np.float32)]), None,
               stats=LatentStats(mean=mean, std=std), as_zip=False)
    images = Dataset(samples=rng.uniform(-1, 1, (48, 3, 16, 16)).astype(np.float32), labels=None,
                     fingerprint="rgb16", source="rgb16", normalisation="none")
    ref = tmp_path / "rgb16.stats.npz"
    write_reference(reference_statistics(images, feature_extractors("pixels:8")), ref)

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--features", "pixels:8", "--fd-samples", "32", "--fd-seeds", "1", "--vae", str(tmp_path / "vae"),
             "--reference-stats", str(ref)]
    assert _study().main([*TINY, "--preset", "smoke", "--engine", "local", "--data", str(tmp_path / "latents"), *flags,
                          "--out", str(out), "--tracking-uri", uri]) == 0
    summary = _check_outputs(out)
    quality, stage = summary["quality"], Path(summary["stages"]["quality"]["dir"])
    assert sorted(quality["models"]) == ["tiny-c4", "tiny-c8"] and quality["metrics"] == ["fd"]
    assert (stage / "reference.stats.npz").read_bytes() == ref.read_bytes()  # the given statistics, not recomputed
    key = json.loads((stage / "config.json").read_text(encoding="utf-8"))["config"]
    assert key["vae"][0] == str((tmp_path / "vae" / "diffusion_pytorch_model.safetensors").absolute())
    assert key["latent_stats"]["source"] == str(tmp_path / "latents") and key["latent_stats"]["mean"] == list(mean)
    for model, row in quality["models"].items():
        train = Path(summary["stages"][f"train-{model}"]["dir"])
        capsys.readouterr()
        assert cli(["evaluate", "--model", str(train), "--vae", str(tmp_path / "vae"), "--latent-stats",
                    str(tmp_path / "latents"), "--reference-stats", str(ref), "--features", "pixels:8",
                    "--n-samples", "32", "--seeds", "1", "--ema", "raw", "--out", str(tmp_path / model), "--json"]) == 0
        direct = json.loads(capsys.readouterr().out)
        assert row["fd"]["per_seed"] == direct["fd"]["per_seed"] and np.isfinite(row["fd"]["mean"])
        totals = [r for r in pq.read_table(train / "loss_curve.parquet").to_pylist() if r["sigma"] is None]
        assert row["flops"] == totals[-1]["flops"] and row["images"] == totals[-1]["images"]
    # EDM2's snapshots sample latents whitened with EDM2's constants: those, not --data's, by default
    study = _study()
    args = study.parse_args(["--data", str(tmp_path / "latents"), "--snapshots", str(tmp_path), *flags])
    assert study.quality_inputs(args, (4, 8, 8))["latent_stats"] is None
    capsys.readouterr()
    assert _study().main(["--dry-run", "--preset", "smoke", "--data", str(tmp_path / "latents"), *flags]) == 0
    assert f"decoded by the VAE {tmp_path / 'vae'}, against --reference-stats {ref}" in capsys.readouterr().out


def test_snapshots_replace_training(tmp_path, one_thread):
    """--snapshots: the loss curves from a folder of EDM2 pickles in the published layout (tests/edm2_pickles.py,
    written from tiny class-conditional networks of two widths: raw snapshots in a folder per model, post-hoc
    names for the other), then the fits and the dashboard as usual; nothing is trained."""
    import numpy as np
    import torch

    import edm2_pickles
    from lossfloor.data import load
    from lossfloor.diffusion import get_preconditioning
    from lossfloor.models import build_uncertainty_head, build_unet, params_of
    from lossfloor.train import forward_flops
    from lossfloor.train.evaluation import evaluate
    from lossfloor.train.loop import split_indices
    from lossfloor.train.losses import Denoiser

    study = _study()
    import _scaling

    snaps, nets = tmp_path / "snaps", {}
    for mc, model in ((4, "tiny-c4"), (8, "edm2-tiny-c8")):
        preset = _scaling.tiny_width(mc)
        for i, kimg in enumerate((1, 4)):
            net, head = build_unet(preset, seed=mc + i), build_uncertainty_head(preset, seed=mc + i)
            with torch.no_grad():
                net.out_gain.fill_(1.0 / (1 + i))
            path = (snaps / model / f"network-snapshot-{kimg:07d}-0.100.pkl" if mc == 4
                    else snaps / f"{model}-{kimg:07d}-0.100.pkl")
            path.parent.mkdir(parents=True, exist_ok=True)
            edm2_pickles.write_snapshot(path, net, head)
            nets[model, kimg] = (preset, net.eval(), head.eval())
    edm2_pickles.write_snapshot(snaps / "tiny-c4" / "network-snapshot-0000001-0.050.pkl", net, head)  # left out

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    assert study.main([*TINY, "--engine", "local", "--snapshots", str(snaps), *FEW, "--out", str(out),
                       "--tracking-uri", uri]) == 0
    _check_store(uri, quality=True)
    summary = _check_outputs(out)
    assert sorted(summary["stages"]) == ["estimate", "fit", "quality", "train-edm2-tiny-c8", "train-tiny-c4"]
    ds = load("bundled:digits", max_samples=600)
    _, idx = split_indices(len(ds), 64, False, 0)
    x0, labels = torch.as_tensor(ds.samples[idx]), torch.as_tensor(ds.labels[idx])
    for model in ("tiny-c4", "edm2-tiny-c8"):
        stage = Path(summary["stages"][f"train-{model}"]["dir"])
        assert not list(stage.glob("checkpoint-*"))
        rows = pq.read_table(stage / "loss_curve.parquet").to_pylist()
        totals = [r for r in rows if r["sigma"] is None]
        preset = nets[model, 1][0]
        assert [r["images"] for r in totals] == [1000, 4000]
        for r in rows:
            assert r["flops"] == pytest.approx(3 * forward_flops(preset.unet, "edm2") * r["images"], rel=1e-12)
            assert r["params"] == params_of(preset.unet) and r["model"] == model
        # the snapshot of 4 kimg, evaluated with our own network (not the pickle): the same per-σ loss
        _, net, head = nets[model, 4]
        den = Denoiser(net, get_preconditioning("edm", sigma_data=0.5), head)
        res = evaluate(den, x0, labels, summary["eval_sigmas"], seed=0, weight=lambda s: torch.ones_like(s),
                       reference_density=lambda s: torch.ones_like(s))
        got = [r["loss"] for r in rows if r["images"] == 4000 and r["sigma"] is not None]
        assert np.allclose(got, res.loss, rtol=1e-5)
    learned = json.loads((Path(summary["stages"]["fit"]["dir"]) / "fits_learned.json").read_text(encoding="utf-8"))
    assert learned["total_learned"]["raw"]["abs_rho"] is not None and learned["total_learned"]["n_models"] == 2
    assert "total_learned" in [r["quantity"] for r in summary["rho"]]

    # the quality stage: each model's last snapshot (4 kimg, the curve's last point) evaluated as `lossfloor
    # evaluate --model PKL` evaluates it, with that point's FLOPs
    from lossfloor.cli import main as cli

    ref = tmp_path / "digits.stats.npz"
    assert cli(["evaluate", "--reference", "--data", "bundled:digits", "--features", "pixels:8", "--out", str(ref)]) == 0
    quality = summary["quality"]
    assert sorted(quality["models"]) == ["edm2-tiny-c8", "tiny-c4"]
    last = {"tiny-c4": snaps / "tiny-c4" / "network-snapshot-0000004-0.100.pkl",
            "edm2-tiny-c8": snaps / "edm2-tiny-c8-0000004-0.100.pkl"}
    for model, row in quality["models"].items():
        assert cli(["evaluate", "--model", str(last[model]), "--reference-stats", str(ref), "--features", "pixels:8",
                    "--n-samples", "32", "--seeds", "2", "--out", str(tmp_path / model)]) == 0
        direct = json.loads((tmp_path / model / "metrics.json").read_text(encoding="utf-8"))
        assert row["fd"]["per_seed"] == direct["fd"]["per_seed"] and row["fd"]["std"] > 0
        assert row["images"] == 4000 and row["flops"] == pytest.approx(
            3 * forward_flops(nets[model, 4][0].unet, "edm2") * 4000, rel=1e-12)


# ---- as users submit it: a local Ray head, `ray job submit`, cluster/runtime_env.yaml ----


def drop_the_stopped_study(uri: str) -> None:
    """Two studies in the store, the stopped one KILLED (not left RUNNING): its runs are deleted, so the
    store then holds the finished study alone."""
    c = client(uri)
    parents = [r for r in c.search_runs([c.get_experiment_by_name("scaling").experiment_id])
               if PARENT_RUN_TAG not in r.data.tags]
    stopped = [r for r in parents if r.info.status != "FINISHED"]
    assert len(parents) == 2 and [r.info.status for r in stopped] == ["KILLED"]
    for r in c.search_runs([stopped[0].info.experiment_id]):
        if r.info.run_id == stopped[0].info.run_id or r.data.tags.get(PARENT_RUN_TAG) == stopped[0].info.run_id:
            c.delete_run(r.info.run_id)


@pytest.mark.e2e
def test_submitted_as_a_ray_job(tmp_path):
    home = tmp_path / "home"  # runtime_env.yaml puts results under ${HOME}/lossfloor on the cluster
    env = job_env(home)
    submit = [RAY, "job", "submit", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml"]
    study = ["--", "python", "studies/scaling_imagenet512.py", *TINY]
    runs = home / "lossfloor" / "runs" / "scaling_imagenet512"
    with ray_head(env, tmp_path / "ray-head.log") as url:
        # the driver is stopped (SIGTERM, as `ray job stop` and schedulers do) once its estimate stage is done...
        first = subprocess.run([*submit, "--address", url, "--no-wait", "--submission-id", "first", *study],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr[-2000:]
        deadline = time.monotonic() + 180
        while not list(runs.glob("estimate-*/DONE.json")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(runs.glob("estimate-*/DONE.json")), "the estimate stage did not finish"
        subprocess.run([RAY, "job", "stop", "--address", url, "first"], env=env, capture_output=True, timeout=120)
        # ... and the same job submitted again continues from the finished stages
        job = subprocess.run([*submit, "--address", url, *study], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    logs = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
    assert "stage estimate: finished earlier" in logs and "skipped" in logs
    assert "runtime_resources/py_modules_files" in logs  # the shipped package ran, not this checkout
    assert "on Ray Train" in logs
    assert "mlflow ui --backend-store-uri sqlite:///" in logs and "|rho| raw" in logs

    results = home / "lossfloor"
    drop_the_stopped_study(f"sqlite:///{results}/mlflow.db")
    _check_store(f"sqlite:///{results}/mlflow.db")
    summary = _check_outputs(results / "runs" / "scaling_imagenet512")
    assert summary["tracking_uri"] == f"sqlite:///{results}/mlflow.db"
