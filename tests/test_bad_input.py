"""Bad input, table-driven: every command and study refuses it before any work with exit 2 and one line
naming the flag or file, no traceback, and leaves nothing behind. A new flag gets its cases by adding rows.

Each row: (what it is, argv with {placeholders} for the files of the `ws` fixture, words the error line
must hold). The outputs a row names (`{out}...`) must not exist afterwards.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_run import cli
from lossfloor.train.space import DEFAULT_SPACE

ROOT = Path(__file__).resolve().parent.parent
SPACE = str(DEFAULT_SPACE)
D = "bundled:digits"


def _study(name):
    sys.path.insert(0, str(ROOT / "studies"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.main


class _First(torch.nn.Module):  # the batch's first sample only
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x[:1]


class _Mean(torch.nn.Module):  # one number
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.mean()


class _PerSample(torch.nn.Module):  # (B, 1, 1, 1)
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True)


class _Inf(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float("inf"))


class _NaNAbove1(torch.nn.Module):  # NaN where t > 1 only
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t.view(-1, 1, 1, 1) > 1.0, torch.full_like(x, float("nan")), x)


class _Same(torch.nn.Module):  # x0 = the noisy input: a valid (poor) unconditional model
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x


class _RaisesAbove1(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if bool((t > 1.0).any()):
            raise RuntimeError("t above 1 is out of my range")
        return x


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Hostile files: a file where a folder should be, a corrupt MLflow database, NaN samples, a torn
    shard, a corrupt PNG in a folder and in a zip, mixed image sizes, J* tables of two data sets, broken
    TorchScript models and a corrupt torch.export file, and a lossfloor run with and without EMA snapshots."""
    from PIL import Image

    from lossfloor.data import load, prepare_shards
    from lossfloor.diffusion import parse_sigmas
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table

    t = tmp_path_factory.mktemp("hostile")
    (t / "blocker").write_text("a file, not a folder")
    (t / "bad.db").write_bytes(b"not an sqlite database " * 50)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.save(t / "other.npy", x)
    x[3, 0, 0, 0] = np.nan
    np.save(t / "nan.npy", x)
    for name, sizes in (("mixed", (8, 16)), ("corrupt", (8, None))):
        (t / name).mkdir()
        for i, size in enumerate(sizes):
            if size is None:
                (t / name / f"{i}.png").write_bytes(b"\x89PNG not really")
            else:
                Image.new("RGB", (size, size)).save(t / name / f"{i}.png")
    with zipfile.ZipFile(t / "badzip.zip", "w") as z:
        z.writestr("0.png", (t / "corrupt" / "0.png").read_bytes())
        z.writestr("1.png", b"\x89PNG not really")
    prepare_shards(D, t / "shards", rows_per_shard=600)
    (t / "torn").mkdir()
    for f in sorted((t / "shards").iterdir()):
        (t / "torn" / f.name).write_bytes(f.read_bytes())
    last = sorted((t / "torn").glob("*.parquet"))[-1]
    last.write_bytes(last.read_bytes()[:300])
    sigmas = parse_sigmas("0.05,0.5,5")
    for name, src in (("digits", D), ("other", str(t / "other.npy"))):
        ds = load(src)
        est = estimate(ds.samples, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
        write_table(build_table(est, target="x0", fingerprint=ds.fingerprint), t / f"{name}.parquet")
    # trainfix: a J* table of the digits at σ = 0.002 alone, one without rows, identical samples and their
    # J* (J*(∞) = 0), a 16x16 RGB PNG folder, a feature network file that is none
    digits = load(D)
    est = estimate(digits.samples, parse_sigmas("0.002"), EstimatorConfig(estimator="exact", queries_per_sample=1),
                   progress=False)
    narrow = build_table(est, target="x0", fingerprint=digits.fingerprint)
    write_table(narrow, t / "narrow.parquet")
    write_table(type(narrow)(narrow.table.slice(0, 0)), t / "empty.parquet")
    np.save(t / "same.npy", np.full((40, 1, 8, 8), 0.5, dtype=np.float32))
    same = load(str(t / "same.npy"))
    est = estimate(same.samples, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    write_table(build_table(est, target="x0", fingerprint=same.fingerprint), t / "same.parquet")
    (t / "rgb16").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(t / "rgb16" / f"{i:02d}.png")
    (t / "weights.pt").write_bytes(b"not a network " * 20)
    np.save(t / "flat.npy", np.arange(40, dtype=np.float32))  # 40 scalars, not 40 samples
    (t / "table.npy").write_text("a,b\n1,2\n3,4\n")  # a CSV under a .npy name
    prepare_shards(t / "other.npy", t / "short", rows_per_shard=16)  # 40 rows; meta.json will claim 50
    meta = (t / "short" / "meta.json").read_text()
    (t / "short" / "meta.json").write_text(meta.replace('"count": 40', '"count": 50'))
    (t / "emptyjpg").mkdir()
    (t / "emptyjpg" / "0.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(t / "emptyjpg" / "1.jpg")
    (t / "dup.yaml").write_text("w_max: {loguniform: [5, 500]}\nmu: {uniform: [-3, -1]}\nw_max: 100\n")
    # diagnose: TorchScript models with the wrong output, a corrupt .pt2, a run with and without snapshots
    x = torch.zeros(2, 1, 8, 8)
    for name, module in (("first", _First()), ("mean", _Mean()), ("inf", _Inf()), ("nan_above_1", _NaNAbove1()),
                         ("raises_above_1", _RaisesAbove1())):
        torch.jit.save(torch.jit.script(module), str(t / f"{name}.pt"))
    torch.jit.save(torch.jit.trace(_PerSample(), (x, torch.ones(2))), str(t / "per_sample.pt"))
    (t / "corrupt.pt2").write_bytes(b"PK\x03\x04" + b"not a torch.export archive" * 20)
    from lossfloor.train import TrainConfig, train

    train(TrainConfig(preset="tiny", batch_n_img=32, duration_n_img=32, warmup_n_img=0, eval_n_samples=8,
                      eval_sigmas=(0.5,), snapshot_every_n_img=32), load(D), checkpoint_dir=t / "run")
    shutil.copytree(t / "run", t / "run-no-snapshots", ignore=shutil.ignore_patterns("ema-*.pt"))
    # numbers (issue 19): digits J* tables with numbers that cannot be trusted, data without values
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = pq.read_table(t / "digits.parquet")
    names = good.column_names
    swapped = good.set_column(names.index("ci_low_x0"), "ci_low_x0", good.column("ci_high_x0"))
    swapped = swapped.set_column(names.index("ci_high_x0"), "ci_high_x0", good.column("ci_low_x0"))
    pq.write_table(swapped, t / "swapped.parquet")
    j = good.column("j_star_x0").to_numpy().copy()
    j[1] = np.nan
    pq.write_table(good.set_column(names.index("j_star_x0"), "j_star_x0", [j]), t / "nanj.parquet")
    pq.write_table(pa.table({"model": ["a", "b", "c"], "flops": [1.0, 2.0, 4.0], "loss": [0.9, 0.8, 0.7],
                             "sigma": [0.5] * 3}), t / "c_sigma.parquet")
    np.save(t / "novalues.npy", np.zeros((40, 0), np.float32))
    # evaluate: reference statistics of the digits in pixels:2
    from lossfloor.train.metrics import feature_extractors
    from lossfloor.train.quality import reference_statistics, write_reference

    write_reference(reference_statistics(load(D), feature_extractors("pixels:2")), t / "digits.stats.npz")
    # encode (issue 20): a tiny AutoencoderKL, one without weights, images both in the root and in a class folder
    from diffusers import AutoencoderKL

    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                  sample_size=16).save_pretrained(t / "vae")
    (t / "vae-noweights").mkdir()
    (t / "vae-noweights" / "config.json").write_text((t / "vae" / "config.json").read_text())
    (t / "mixedlabels" / "cat").mkdir(parents=True)
    Image.new("RGB", (9, 12)).save(t / "mixedlabels" / "0.png")
    Image.new("RGB", (12, 9)).save(t / "mixedlabels" / "cat" / "1.png")
    (t / "labels.json").write_text('{"labels": [["cat/1.png", 0]]}')
    for name in ("a/0.png", "b/1.png"):
        (t / "classes" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10)).save(t / "classes" / name)
    # snapshots (issue 20): an EDM2 pickle that would run a command, a class-conditional tiny EDM2 snapshot, a
    # snapshot folder holding a .pkl of another name
    import os
    import pickle

    import edm2_pickles
    from lossfloor.models import build_uncertainty_head, build_unet, get_preset

    class _System:
        def __reduce__(self):
            return os.system, (f"touch {t / 'pwned'}",)

    (t / "evil.pkl").write_bytes(pickle.dumps({"ema": _System()}))
    tiny = get_preset("tiny")
    edm2_pickles.write_snapshot(t / "network-snapshot-0000001-0.100.pkl", build_unet(tiny), build_uncertainty_head(tiny))
    (t / "foreignpkl").mkdir()
    (t / "foreignpkl" / "model.pkl").write_bytes(pickle.dumps({"net": 1}))
    # condfloor (issue 20): the class-conditional J* of the digits, a valid unconditional TorchScript model
    from lossfloor.floor import estimate_conditional

    est = estimate_conditional(digits.samples, digits.labels, sigmas,
                               EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    write_table(build_table(est, target="x0", fingerprint=digits.fingerprint), t / "cond.parquet")
    torch.jit.save(torch.jit.script(_Same()), str(t / "same.pt"))
    # evallatent (issue 21): a run trained on (4, 8, 8) latents, an EDM2 snapshot of such latents
    from lossfloor.models import sized_preset

    np.save(t / "latents.npy", rng.standard_normal((40, 4, 8, 8)).astype(np.float32) * 0.5)
    train(TrainConfig(preset=sized_preset((4, 8, 8)), batch_n_img=32, duration_n_img=32, warmup_n_img=0,
                      eval_n_samples=8, eval_sigmas=(0.5,)), load(str(t / "latents.npy")), checkpoint_dir=t / "latentrun")
    latent = sized_preset((4, 8, 8))
    edm2_pickles.write_snapshot(t / "latent-snapshot.pkl", build_unet(latent), build_uncertainty_head(latent))
    return t


E = ["estimate", "--data", D, "--sigmas", "0.1,1"]
TR = ["train", "--data", D, "--images", "64", "--batch", "32"]
SW = ["sweep", "--data", D, "--space", SPACE, "--trials", "2"]
CLI_ROWS = [
    ("estimate: --out under a file", [*E, "--out", "{ws}/blocker/j.parquet"], ["--out", "is a file"]),
    ("estimate: --out unwritable", [*E, "--out", "/proc/lossfloor/j.parquet"], ["--out", "cannot write"]),
    ("estimate: --out a folder", [*E, "--out", "{ws}"], ["--out", "parquet"]),
    ("estimate: corrupt tracking db", [*E, "--out", "{out}.parquet", "--mlflow", "--tracking-uri", "sqlite:///{ws}/bad.db"], ["--tracking-uri", "not an SQLite database"]),
    ("estimate: no tracking server", [*E, "--out", "{out}.parquet", "--mlflow", "--tracking-uri", "http://127.0.0.1:1"], ["--tracking-uri", "no tracking server answers"]),
    ("estimate: --tracking-uri without --mlflow", [*E, "--out", "{out}.parquet", "--tracking-uri", "sqlite:///x.db"],
     ["--tracking-uri", "only with --mlflow"]),
    ("estimate: cuda without CUDA", [*E, "--out", "{out}.parquet", "--device", "cuda"], ["--device", "no CUDA"]),
    ("estimate: bad device", [*E, "--out", "{out}.parquet", "--device", "tpu"], ["--device", "cpu, cuda"]),
    ("estimate: negative seed", [*E, "--out", "{out}.parquet", "--seed", "-1"], ["--seed", ">= 0"]),
    ("estimate: zero device cap", [*E, "--out", "{out}.parquet", "--max-device-gb", "0"], ["--max-device-gb", "> 0"]),
    ("estimate: device cap below a row", [*E, "--out", "{out}.parquet", "--max-device-gb", "1e-9"],
     ["--max-device-gb", "below the working memory"]),
    ("estimate: absurd grid", ["estimate", "--data", D, "--sigma-grid", "0.1:10:100000000000", "--out",
                               "{out}.parquet"], ["--sigma-grid", "at most 10000"]),
    ("estimate: absurd K", [*E, "--out", "{out}.parquet", "--queries-per-sample", "100000000"],
     ["--queries-per-sample", "at most"]),
    ("estimate: sigma that underflows", [*E[:3], "--sigmas", "1e-300,1", "--out", "{out}.parquet"],
     ["--sigmas", "[1e-10, 1e+10]"]),
    ("estimate: sigma that overflows", [*E[:3], "--sigmas", "1e300", "--out", "{out}.parquet"], ["--sigmas"]),
    ("estimate: subnormal grid end", [*E[:3], "--sigma-grid", "1e-320:1:4", "--out", "{out}.parquet"],
     ["--sigma-grid", "[1e-10, 1e+10]"]),
    ("estimate: NaN data", ["estimate", "--data", "{ws}/nan.npy", "--sigmas", "1", "--out", "{out}.parquet"],
     ["nan.npy", "sample 3"]),
    ("estimate: missing data", ["estimate", "--data", "{ws}/nope.npy", "--sigmas", "1", "--out", "{out}.parquet"],
     ["nope.npy", "no such file"]),
    ("estimate: --work-dir under a file", [*E, "--out", "{out}.parquet", "--work-dir", "{ws}/blocker/w"],
     ["--work-dir", "is a file"]),
    ("data describe: mixed sizes", ["data", "describe", "{ws}/mixed"], ["1.png", "shape"]),
    ("data describe: corrupt png", ["data", "describe", "{ws}/corrupt"], ["1.png", "PNG"]),
    ("data describe: NaN values", ["data", "describe", "{ws}/nan.npy"], ["nan.npy", "sample 3"]),
    ("data describe: bad png in a zip", ["data", "describe", "{ws}/badzip.zip"], ["badzip.zip:1.png"]),
    ("data describe: torn shard", ["data", "describe", "{ws}/torn"], ["parquet shard"]),
    ("data prepare: --out unwritable", ["data", "prepare", D, "--out", "/proc/lossfloor/s"], ["--out", "cannot write"]),
    ("data prepare: --out under a file", ["data", "prepare", D, "--out", "{ws}/blocker/s"], ["--out", "is a file"]),
    ("data prepare: rows 0", ["data", "prepare", D, "--out", "{out}", "--rows-per-shard", "0"], ["--rows-per-shard"]),
    ("train: --out unwritable", [*TR, "--out", "/proc/lossfloor/run"], ["--out", "cannot write"]),
    ("train: --out a file", [*TR, "--out", "{ws}/blocker"], ["--out", "not a folder"]),
    ("train: cuda without CUDA", [*TR, "--out", "{out}", "--device", "cuda"], ["--device", "no CUDA"]),
    ("train: negative seed", [*TR, "--out", "{out}", "--seed", "-1"], ["--seed"]),
    ("train: absurd --images", ["train", "--data", D, "--batch", "32", "--images", "100000000000000", "--out", "{out}"], ["--images", "at most"]),
    ("train: J* of other data", [*TR, "--out", "{out}", "--j-star", "{ws}/other.parquet", "--schedule", "optimal-loss"], ["--j-star", "fingerprint"]),
    ("train: corrupt tracking db", [*TR, "--out", "{out}", "--mlflow", "--tracking-uri", "sqlite:///{ws}/bad.db"],
     ["--tracking-uri", "not an SQLite database"]),
    ("train: bad --eval-sigmas", [*TR, "--out", "{out}", "--eval-sigmas=-1,abc"], ["--eval-sigmas"]),
    ("train: images between two batches", [*TR[:3], "--images", "100", "--batch", "32", "--out", "{out}"],
     ["--images", "100", "give 96 or 128"]),
    ("train: --eval-sigmas that underflow", [*TR, "--out", "{out}", "--eval-sigmas", "1e-300,1"],
     ["--eval-sigmas", "[1e-10, 1e+10]"]),
    ("train: NaN data", ["train", "--data", "{ws}/nan.npy", "--images", "64", "--batch", "32", "--eval-samples", "8", "--out", "{out}",
                         "--unconditional"], ["nan.npy"]),
    ("fit: negative --j-star-value", ["fit", "--curves", "{ws}/c.parquet", "--j-star-value", "-1", "--out",
                                      "{out}.json"], ["--j-star-value"]),
    ("fit: --out under a file", ["fit", "--curves", "{ws}/c.parquet", "--j-star-value", "1", "--out",
                                 "{ws}/blocker/f.json"], ["--out", "is a file"]),
    ("dashboard: corrupt tracking db", ["dashboard", "--experiment", "scaling", "--out", "{out}.html",
                                        "--tracking-uri", "sqlite:///{ws}/bad.db"], ["not an SQLite database"]),
    ("dashboard: no database", ["dashboard", "--experiment", "scaling", "--out", "{out}.html", "--tracking-uri",
                                "sqlite:///{ws}/none.db"], ["no MLflow database"]),
    ("dashboard: no tracking server", ["dashboard", "--experiment", "scaling", "--out", "{out}.html",
                                       "--tracking-uri", "http://127.0.0.1:1"], ["no tracking server answers"]),
    ("dashboard: --out not html", ["dashboard", "--experiment", "scaling", "--out", "{out}.txt"], ["--out", "html"]),
    ("sweep: missing data", ["sweep", "--data", "{ws}/nope.npy", "--space", SPACE, "--trials", "2", "--out",
                             "{out}"], ["nope.npy"]),
    ("sweep: --out unwritable", [*SW, "--out", "/proc/lossfloor/sw"], ["--out", "cannot write"]),
    ("sweep: J* of other data", [*SW, "--out", "{out}", "--j-star", "{ws}/other.parquet"], ["--j-star", "fingerprint"]),
    ("sweep: negative seed", [*SW, "--out", "{out}", "--seed", "-1"], ["--seed"]),
    ("sweep: corrupt tracking db", [*SW, "--out", "{out}", "--mlflow", "--tracking-uri", "sqlite:///{ws}/bad.db"],
     ["not an SQLite database"]),
    ("model-info: unknown preset", ["model-info", "--preset", "huge"], ["--preset"]),
    ("argparse: unknown flag", ["estimate", "--bogus"], ["--help"]),
]
# The engine flags (`lossfloor.jobs.engine`) are one set, refused the same way by every command
DG = ["diagnose", "--model", "{ws}/model", "--data", D, "--sigmas", "0.1,1", "--out", "{out}.parquet"]
ENGINE_COMMANDS = {"estimate": [*E, "--out", "{out}.parquet"], "train": [*TR, "--out", "{out}"], "diagnose": DG,
                   "sweep": [*SW, "--out", "{out}"]}
ENGINE_ROWS = [
    ("--gpus-per-worker -1", ["--engine", "ray", "--gpus-per-worker", "-1"],
     ["--gpus-per-worker: expected a number >= 0 (e.g. 1 or 0.5), got -1"]),
    ("--workers 0", ["--engine", "ray", "--workers", "0"], ["--workers: expected an integer >= 1, got 0"]),
    ("--cpus-per-worker nan", ["--engine", "ray", "--cpus-per-worker", "nan"],
     ["--cpus-per-worker: expected a number > 0, got nan"]),
    ("--address malformed", ["--engine", "ray", "--address", "nonsense"], ["--address", "HOST:PORT"]),
    ("unknown engine", ["--engine", "spark"], ["--engine: expected one of local, ray, got 'spark'"]),
    ("a Ray flag without --engine ray", ["--engine", "local", "--gpus-per-worker", "1"],
     ["--gpus-per-worker: only with --engine ray"]),
]
CLI_ROWS += [(f"{command}: {case}", [*argv, *flags], words) for command, argv in ENGINE_COMMANDS.items()
             for case, flags, words in ENGINE_ROWS]
CLI_ROWS += [("sweep: --engine local", [*SW, "--out", "{out}", "--engine", "local"],  # a sweep runs on Ray only
              ["--engine: a sweep runs its trials on Ray Tune: expected ray, got 'local'"])]

SURVEY = ["--smoke", "--tracking-uri", "sqlite:///{ws}/ok.db"]
SCALING = ["--smoke-budget", "tiny", "--tracking-uri", "sqlite:///{ws}/ok.db"]
SWEEP = ["--tracking-uri", "sqlite:///{ws}/ok.db"]
STUDY_ROWS = [
    ("optimal_loss_survey", "bad --data", [*SURVEY, "--data", "{ws}/nope.npy", "--out", "{out}"], ["nope.npy"]),
    ("optimal_loss_survey", "--workers 0", [*SURVEY, "--engine", "ray", "--workers", "0", "--out", "{out}"],
     ["--workers"]),
    ("optimal_loss_survey", "--out a file", [*SURVEY, "--out", "{ws}/blocker"], ["--out", "not a folder"]),
    ("optimal_loss_survey", "--out unwritable", [*SURVEY, "--out", "/proc/lossfloor/sv"], ["--out", "cannot write"]),
    ("optimal_loss_survey", "negative seed", [*SURVEY, "--seed", "-1", "--out", "{out}"], ["--seed"]),
    ("optimal_loss_survey", "corrupt tracking db", ["--smoke", "--tracking-uri", "sqlite:///{ws}/bad.db", "--out",
                                                    "{out}"], ["--tracking-uri", "not an SQLite database"]),
    ("optimal_loss_survey", "absurd grid", [*SURVEY, "--sigma-grid", "0.1:10:100000000000", "--out", "{out}"],
     ["--sigma-grid"]),
    ("optimal_loss_survey", "cuda without CUDA", [*SURVEY, "--device", "cuda", "--out", "{out}"], ["--device"]),
    ("optimal_loss_survey", "unknown flag", ["--bogus"], ["--bogus", "--help"]),
    ("optimal_loss_survey", "negative device cap", [*SURVEY, "--max-device-gb", "-2", "--out", "{out}"],
     ["--max-device-gb"]),
    ("scaling_imagenet512", "negative device cap", [*SCALING, "--max-device-gb", "-2", "--out", "{out}"],
     ["--max-device-gb"]),
    ("scaling_imagenet512", "bad --fit-sigmas", [*SCALING, "--fit-sigmas=-1,abc", "--out", "{out}"], ["--fit-sigmas"]),
    ("scaling_imagenet512", "--fit-sigmas off the grid", [*SCALING, "--fit-sigmas", "1e6", "--out", "{out}"],
     ["--fit-sigmas", "outside the J* grid"]),
    ("scaling_imagenet512", "--fit-sigmas below the grid", [*SCALING, "--fit-sigmas", "0.00001", "--out", "{out}"],
     ["--fit-sigmas", "outside"]),
    ("scaling_imagenet512", "--out a file", [*SCALING, "--out", "{ws}/blocker"], ["--out", "not a folder"]),
    ("scaling_imagenet512", "negative seed", [*SCALING, "--seed", "-1", "--out", "{out}"], ["--seed"]),
    ("scaling_imagenet512", "corrupt tracking db", ["--smoke-budget", "tiny", "--tracking-uri", "sqlite:///{ws}/bad.db",
                                                    "--out", "{out}"], ["not an SQLite database"]),
    ("scaling_imagenet512", "J* of other data", [*SCALING, "--j-star", "{ws}/other.parquet", "--out", "{out}"],
     ["--j-star", "fingerprint"]),
    ("scaling_imagenet512", "unknown preset", ["--preset", "bogus"], ["--preset", "--help"]),
    ("schedule_sweep", "corrupt tracking db", ["--tracking-uri", "sqlite:///{ws}/bad.db", "--out", "{out}"],
     ["not an SQLite database"]),
    ("schedule_sweep", "J* of other data", [*SWEEP, "--j-star", "{ws}/other.parquet", "--out", "{out}"],
     ["--j-star", "fingerprint"]),
    ("schedule_sweep", "--out unwritable", [*SWEEP, "--out", "/proc/lossfloor/ss"], ["--out", "cannot write"]),
]
STUDY_ROWS += [(study, f"engine: {case}", [*argv, *flags, "--out", "{out}"], words)
               for study, argv in (("optimal_loss_survey", SURVEY), ("scaling_imagenet512", SCALING),
                                   ("schedule_sweep", SWEEP))
               for case, flags, words in ENGINE_ROWS]
# trainfix: `lossfloor train` and `lossfloor sweep` (issue 19)
RGB = ["train", "--data", "{ws}/rgb16", "--images", "64", "--batch", "32", "--eval-samples", "8", "--out", "{out}"]
CLI_ROWS += [
    ("train: --eval-sigmas outside the J* grid", [*TR, "--out", "{out}", "--j-star", "{ws}/narrow.parquet",
                                                  "--eval-sigmas", "0.1,1,10"],
     ["--eval-sigmas", "σ = 0.1, 1, 10 outside", "[0.002, 0.002]", "--j-star"]),
    ("train: default evaluation grid beyond the J* grid", [*TR, "--out", "{out}", "--j-star", "{ws}/digits.parquet"],
     ["--eval-sigmas", "default evaluation grid", "[0.05, 5]", "give --eval-sigmas within"]),
    ("train: optimal-loss on identical samples", ["train", "--data", "{ws}/same.npy", "--images", "64", "--batch",
                                                  "32", "--eval-samples", "8", "--eval-sigmas", "0.5",
                                                  "--schedule", "optimal-loss", "--j-star", "{ws}/same.parquet",
                                                  "--out", "{out}", "--mlflow", "--tracking-uri", "sqlite:///{out}.db"],
     ["--j-star", "J*(inf) = 0", "edm2"]),
    ("train: J* table without rows", [*TR, "--out", "{out}", "--j-star", "{ws}/empty.parquet"],
     ["--j-star", "empty.parquet", "no rows"]),
    ("train: 16x16 RGB data with the tiny preset", RGB, ["--data", "(3, 16, 16)", "expects (1, 8, 8)", "--preset auto"]),
    ("train: --conditional with --preset auto", [*RGB, "--preset", "auto", "--conditional"],
     ["--conditional", "no classes"]),
    ("sweep: --grace-images beyond --images", [*SW, "--out", "{out}", "--images", "64", "--batch", "32",
                                               "--grace-images", "128"], ["--grace-images", "128", "--images"]),
    ("sweep: corrupt --fd-weights in a dry run", [*SW, "--out", "{out}", "--objective", "fd", "--fd-weights",
                                                  "{ws}/weights.pt", "--dry-run"], ["--fd-weights", "weights.pt"]),
    ("sweep: --eval-sigmas outside the J* grid", [*SW, "--out", "{out}", "--j-star", "{ws}/digits.parquet",
                                                  "--eval-sigmas", "0.01,1"], ["--eval-sigmas", "σ = 0.01 outside"]),
]
# issue 19: tracking, Ray, data reading, fit, the survey and the command line's words
CLI_ROWS += [
    ("estimate: a tracking URI of no store", [*E, "--out", "{out}.parquet", "--mlflow", "--tracking-uri", "garbage://x"],
     ["--tracking-uri garbage://x", "no tracking store for garbage://"]),
    ("fit: absurd --bootstrap", ["fit", "--curves", "{ws}/c.parquet", "--bootstrap", "1000000000", "--out", "{out}.json"],
     ["--bootstrap: expected an integer in [0, 100000]"]),
    ("estimate: a 1-D array", ["estimate", "--data", "{ws}/flat.npy", "--sigmas", "1", "--out", "{out}.parquet"],
     ["flat.npy", "shape (40,)", "40 scalars", "(40, 1)"]),
    ("data describe: shards claiming more rows", ["data", "describe", "{ws}/short"],
     ["expected 50 samples", "holds only 40"]),
    ("estimate: a CSV named .npy", ["estimate", "--data", "{ws}/table.npy", "--sigmas", "1", "--out", "{out}.parquet"],
     ["table.npy", "not a .npy file"]),
    ("estimate: --max-device-gb inf", [*E, "--out", "{out}.parquet", "--max-device-gb", "inf"],
     ["--max-device-gb: expected a finite number", "got inf"]),
    ("data describe: a zero-byte JPEG", ["data", "describe", "{ws}/emptyjpg"], ["0.jpg", "empty file (0 bytes)"]),
    ("estimate: --c with exact", [*E, "--out", "{out}.parquet", "--estimator", "exact", "--c", "2"],
     ["--c:", "only with --estimator cdol", "--estimator exact would ignore it"]),
    ("estimate: --index-pca with exact", [*E, "--out", "{out}.parquet", "--estimator", "exact", "--index-pca", "4"],
     ["--index-pca:", "only with --estimator knn", "--estimator exact would ignore it"]),
    ("sweep: a key twice in --space", ["sweep", "--data", D, "--space", "{ws}/dup.yaml", "--trials", "2", "--out",
                                       "{out}"], ["dup.yaml", "'w_max' is given twice (line 3)"]),
    ("estimate: unknown --dtype", [*E, "--out", "{out}.parquet", "--dtype", "float16"],
     ["--dtype: expected float32 or float64"]),
    ("estimate: --index-pca 0", [*E, "--out", "{out}.parquet", "--estimator", "knn", "--index-pca", "0"],
     ["--index-pca: expected an integer >= 1"]),
    ("estimate: --index-pca on the torch search", [*E, "--out", "{out}.parquet", "--estimator", "knn", "--index",
                                                   "torch", "--index-pca", "4"], ["--index-pca: needs a FAISS index"]),
    ("estimate: knn --subset-size below 4", [*E, "--out", "{out}.parquet", "--estimator", "knn", "--subset-size", "3"],
     ["--subset-size: knn needs L >= 4"]),
]
STUDY_ROWS += [
    ("optimal_loss_survey", "a bad --data after the digits", [*SURVEY, "--data", "{ws}/nan.npy", "--out", "{out}"],
     ["nan.npy", "sample 3"]),
]
# the same, for settings in the environment: (what it is, variables, argv, words the error line must hold)
ENV_ROWS = [
    ("MLFLOW_TRACKING_URI of no store", {"MLFLOW_TRACKING_URI": "garbage://x"},
     [*E, "--out", "{out}.parquet", "--mlflow"], ["MLFLOW_TRACKING_URI garbage://x", "no tracking store"]),
    ("LOSSFLOOR_NODE_CACHE unwritable", {"LOSSFLOOR_NODE_CACHE": "/proc/lossfloor/cache"},
     [*E, "--out", "{out}.parquet", "--engine", "ray"], ["$LOSSFLOOR_NODE_CACHE /proc/lossfloor/cache", "cannot write"]),
]

# issue 19, diagnose: models with the wrong output shape, NaN or inf, or an exception at some σ; a corrupt
# .pt2; --ema and --estimator named with their choices before any work
DGB = ["diagnose", "--data", D, "--j-star", "{ws}/digits.parquet", "--sigmas", "0.05,5", "--n-samples", "64",
       "--out", "{out}.parquet"]
DTS = [*DGB, "--prediction", "x0", "--model"]
CLI_ROWS += [
    ("diagnose: output of the first sample only", [*DTS, "{ws}/first.pt"],
     ["--model", "first.pt", "output of shape (1, 1, 8, 8) for an input of shape (3, 1, 8, 8)"]),
    ("diagnose: scalar output", [*DTS, "{ws}/mean.pt"], ["--model", "mean.pt", "output of shape ()"]),
    ("diagnose: (B, 1, 1, 1) output", [*DTS, "{ws}/per_sample.pt"], ["--model", "per_sample.pt", "(3, 1, 1, 1)"]),
    ("diagnose: inf output", [*DTS, "{ws}/inf.pt"], ["--model", "inf.pt", "NaN or inf at σ = 0.05"]),
    ("diagnose: NaN above σ = 1", [*DTS, "{ws}/nan_above_1.pt"], ["--model", "nan_above_1.pt", "NaN or inf at σ = 5"]),
    ("diagnose: raises above σ = 1", [*DTS, "{ws}/raises_above_1.pt"],
     ["--model", "raises_above_1.pt", "fails at σ = 5", "t above 1 is out of my range"]),
    ("diagnose: corrupt .pt2", [*DTS, "{ws}/corrupt.pt2"], ["--model", "corrupt.pt2"]),
    ("diagnose: --ema posthoc without snapshots", [*DGB, "--model", "{ws}/run-no-snapshots", "--ema", "posthoc:0.1"],
     ["--ema: posthoc:0.1 needs EMA snapshots", "run-no-snapshots", "--ema raw, --ema 0.05, --ema 0.1"]),
    ("diagnose: --ema posthoc out of range", [*DGB, "--model", "{ws}/run", "--ema", "posthoc:0.3"],
     ["--ema: posthoc:0.3 is out of range", "(run ", "--ema posthoc:SIGMA_REL"]),
    ("diagnose: --ema not a choice", [*DGB, "--model", "{ws}/run", "--ema", "best"],
     ["--ema: best is not", "--ema auto, --ema raw"]),
    ("diagnose: unknown --estimator", [*DGB[:3], *DGB[5:], "--model", "{ws}/first.pt", "--prediction", "x0",
                                       "--estimator", "foo"], ["--estimator", "exact", "'foo'"]),
    ("diagnose: --estimator with --j-star", [*DTS, "{ws}/first.pt", "--estimator", "exact"],
     ["--estimator exact: only without --j-star"]),
]
# numbers (issue 19): a J* table that cannot be trusted is refused by every reader; data without values are
# refused before any estimate
CLI_ROWS += [
    ("estimate: data without values", ["estimate", "--data", "{ws}/novalues.npy", "--sigmas", "1", "--out",
                                       "{out}.parquet"], ["--data", "novalues.npy", "hold no values"]),
    ("fit: zero-row J* table", ["fit", "--curves", "{ws}/c_sigma.parquet", "--j-star", "{ws}/empty.parquet", "--sigma",
                                "0.5", "--out", "{out}.json"], ["empty.parquet", "no rows"]),
    ("fit: ci_low above ci_high", ["fit", "--curves", "{ws}/c_sigma.parquet", "--j-star", "{ws}/swapped.parquet",
                                   "--sigma", "0.5", "--out", "{out}.json"], ["swapped.parquet", "row 1", "is above ci_high_x0"]),
    ("diagnose: J* table with NaN", [*DG, "--j-star", "{ws}/nanj.parquet"], ["nanj.parquet", "row 1", "j_star_x0"]),
    ("train: ci_low above ci_high", [*TR, "--out", "{out}", "--j-star", "{ws}/swapped.parquet", "--schedule",
                                     "optimal-loss"], ["swapped.parquet", "is above"]),
    ("sweep: zero-row J* table", [*SW, "--out", "{out}", "--j-star", "{ws}/empty.parquet"], ["empty.parquet", "no rows"]),
]
STUDY_ROWS += [
    ("scaling_imagenet512", "J* table with NaN", [*SCALING, "--j-star", "{ws}/nanj.parquet", "--out", "{out}"],
     ["--j-star", "nanj.parquet", "j_star_x0"]),
    ("schedule_sweep", "ci_low above ci_high", [*SWEEP, "--j-star", "{ws}/swapped.parquet", "--out", "{out}"],
     ["swapped.parquet", "is above"]),
]
# issue 20, post-hoc EMA in the scaling study: --ema is refused before any work, with the same parser as
# diagnose's (lossfloor.train.ema.parse_ema)
STUDY_ROWS += [
    ("scaling_imagenet512", "--ema posthoc out of range", [*SCALING, "--ema", "posthoc:0.3", "--out", "{out}"],
     ["--ema: posthoc:0.3 is out of range", "(0, 0.2887)"]),
    ("scaling_imagenet512", "--ema not a choice", [*SCALING, "--ema", "best", "--out", "{out}"],
     ["--ema: best is not raw, a tracked sigma_rel or posthoc:SIGMA_REL"]),
    ("scaling_imagenet512", "--ema not tracked", [*SCALING, "--ema", "0.07", "--out", "{out}"],
     ["--ema: 0.07 is not tracked", "0.05, 0.1", "posthoc:SIGMA_REL"]),
    ("scaling_imagenet512", "--ema posthoc without snapshots",
     [*SCALING, "--ema", "posthoc:0.1", "--no-ema-snapshots", "--out", "{out}"],
     ["--ema: posthoc:0.1 needs EMA snapshots", "--no-ema-snapshots"]),
    ("scaling_imagenet512", "--ema posthoc without snapshots, dry run",
     [*SCALING, "--dry-run", "--ema", "posthoc:0.1", "--no-ema-snapshots", "--out", "{out}"],
     ["--ema: posthoc:0.1 needs EMA snapshots"]),
]

# evaluate (issue 21): feature networks, reference statistics, guidance, counts
EV = ["evaluate", "--model", "{ws}/run", "--reference-stats", "{ws}/digits.stats.npz", "--features", "pixels:2"]
CLI_ROWS += [
    ("evaluate: a feature network file that is none", ["evaluate", "--reference", "--data", D, "--features",
                                                      "network:{ws}/weights.pt", "--out", "{out}.npz"],
     ["--features", "weights.pt", "not a TorchScript file"]),
    ("evaluate: CFG without an unconditional branch", [*EV, "--out", "{out}", "--guidance", "2"],
     ["--guidance 2", "no unconditional branch", "--guide-model"]),
    ("evaluate: 0 samples", [*EV, "--out", "{out}", "--n-samples", "0"], ["--n-samples", ">= 2"]),
    ("evaluate: 0 seeds", [*EV, "--out", "{out}", "--seeds", "0"], ["--seeds", ">= 1"]),
    ("evaluate: statistics of other data", [*EV, "--out", "{out}", "--data", "{ws}/other.npy"],
     ["--reference-stats", "other data"]),
    ("evaluate: statistics of other features", ["evaluate", "--model", "{ws}/run", "--reference-stats",
                                                "{ws}/digits.stats.npz", "--features", "pixels", "--out", "{out}"],
     ["--reference-stats", "features pixels:2, not pixels"]),
    ("evaluate: a statistics file that is none", ["evaluate", "--model", "{ws}/run", "--reference-stats",
                                                  "{ws}/weights.pt", "--features", "pixels:2", "--out", "{out}"],
     ["--reference-stats", "not a lossfloor statistics file"]),
    ("evaluate: a guide model without guidance", [*EV, "--out", "{out}", "--guide-model", "{ws}/run"],
     ["--guide-model", "--guidance"]),
    ("evaluate: no statistics", ["evaluate", "--model", "{ws}/run", "--features", "pixels", "--out", "{out}"],
     ["--reference-stats"]),
    ("evaluate: a model that outputs inf", ["evaluate", "--model", "{ws}/inf.pt", "--prediction", "x0",
                                            "--reference-stats", "{ws}/digits.stats.npz", "--features", "pixels:2",
                                            "--out", "{out}"], ["--model", "inf.pt", "NaN or inf"]),
    ("evaluate: a model that raises at large σ", ["evaluate", "--model", "{ws}/raises_above_1.pt", "--prediction",
                                                  "x0", "--reference-stats", "{ws}/digits.stats.npz", "--features",
                                                  "pixels:2", "--out", "{out}"], ["--model", "raises_above_1.pt", "σ = 80"]),
]
# encode (issue 20): `lossfloor data encode` / `decode` refuse a VAE folder without weights, undecodable
# images, mixed label schemes, a resolution that is no multiple of 8, an existing --out
ENC = ["data", "encode", "--vae", "{ws}/vae", "--resolution", "8", "--device", "cpu"]
CLI_ROWS += [
    ("data encode: VAE without weights", [*ENC[:3], "{ws}/vae-noweights", *ENC[4:], "--data", "{ws}/rgb16", "--out",
                                          "{out}"], ["--vae", "vae-noweights", "no weights"]),
    ("data encode: VAE folder missing", [*ENC[:3], "{ws}/novae", *ENC[4:], "--data", "{ws}/rgb16", "--out", "{out}"],
     ["--vae", "no such folder"]),
    ("data encode: undecodable image", [*ENC, "--data", "{ws}/corrupt", "--out", "{out}"], ["1.png", "PNG"]),
    ("data encode: empty image in a folder", [*ENC, "--data", "{ws}/emptyjpg", "--out", "{out}"], ["0.jpg", "empty"]),
    ("data encode: undecodable image in a zip", [*ENC, "--data", "{ws}/badzip.zip", "--out", "{out}.zip", "--format",
                                                 "edm2"], ["badzip.zip:1.png"]),
    ("data encode: images in the root and in class folders", [*ENC, "--data", "{ws}/mixedlabels", "--out", "{out}"],
     ["mixedlabels", "found both"]),
    ("data encode: labels file and class folders", [*ENC, "--data", "{ws}/classes", "--labels", "{ws}/labels.json",
                                                    "--out", "{out}"], ["--labels", "class sub-folders"]),
    ("data encode: labels file without an image", [*ENC, "--data", "{ws}/rgb16", "--labels", "{ws}/labels.json",
                                                   "--out", "{out}"], ["--labels", "labels.json", "none for 00.png"]),
    ("data encode: --resolution 12", [*ENC[:5], "12", "--data", "{ws}/rgb16", "--out", "{out}"],
     ["--resolution", "multiple of 8"]),
    ("data encode: --resolution 0", [*ENC[:5], "0", "--data", "{ws}/rgb16", "--out", "{out}"], ["--resolution"]),
    ("data encode: existing --out", [*ENC, "--data", "{ws}/rgb16", "--out", "{ws}/rgb16"], ["--out", "exists"]),
    ("data encode: unknown --format", [*ENC, "--data", "{ws}/rgb16", "--out", "{out}", "--format", "npz"],
     ["--format", "shards, edm2"]),
    ("data encode: --device with --engine ray", [*ENC, "--data", "{ws}/rgb16", "--out", "{out}", "--engine", "ray"],
     ["--device", "--gpus-per-worker"]),
    ("data decode: VAE without weights", ["data", "decode", "--data", "{ws}/other.npy", "--vae", "{ws}/vae-noweights",
                                          "--out", "{out}"], ["--vae", "no weights"]),
    ("data decode: not latents", ["data", "decode", "--data", "{ws}/rgb16", "--vae", "{ws}/vae", "--out", "{out}",
                                  "--device", "cpu"], ["--data", "latent set"]),
]
# snapshots (issue 20): EDM2 network pickles
CLI_ROWS += [
    ("diagnose: an EDM2 pickle that would run a command", [*DGB, "--model", "{ws}/evil.pkl"],
     ["evil.pkl", "refused global", "system", "nothing from this file was run"]),
    ("diagnose: a class-conditional snapshot on unlabelled data",
     ["diagnose", "--data", "{ws}/other.npy", "--j-star", "{ws}/other.parquet", "--sigmas", "0.05,5", "--out",
      "{out}.parquet", "--model", "{ws}/network-snapshot-0000001-0.100.pkl"],
     ["network-snapshot-0000001-0.100.pkl", "class-conditional (10 classes)", "no labels"]),
]
STUDY_ROWS += [
    ("scaling_imagenet512", "--snapshots: no such folder", [*SCALING, "--snapshots", "{ws}/nosuch", "--out", "{out}"],
     ["--snapshots", "nosuch", "not a folder"]),
    ("scaling_imagenet512", "--snapshots: a .pkl of another name",
     [*SCALING, "--snapshots", "{ws}/foreignpkl", "--out", "{out}"], ["--snapshots", "model.pkl", "EDM2 file name"]),
]

# condfloor (issue 20): the class-conditional floor needs labels, and every model is measured against the floor
# of its kind: a class-conditional model against the class-conditional floor, an unconditional one against the
# unconditional floor
CLI_ROWS += [
    ("estimate: --conditional on unlabelled data", ["estimate", "--data", "{ws}/other.npy", "--sigmas", "1",
                                                    "--conditional", "--out", "{out}.parquet"],
     ["--conditional", "other.npy", "has no class labels"]),
    ("estimate: --conditional with --rel-error", [*E, "--out", "{out}.parquet", "--conditional", "--rel-error", "0.1"],
     ["--rel-error", "not supported for the class-conditional floor"]),
    ("train: a conditional model against the unconditional floor", [*TR, "--out", "{out}", "--conditional",
                                                                    "--j-star", "{ws}/digits.parquet"],
     ["--j-star", "the unconditional floor, but the model is class-conditional", "--conditional"]),
    ("train: an unconditional model against the class-conditional floor", [*TR, "--out", "{out}", "--unconditional",
                                                                           "--j-star", "{ws}/cond.parquet"],
     ["--j-star", "a class-conditional floor", "has no class labels"]),
    ("diagnose: a conditional run against the unconditional floor", [*DGB, "--model", "{ws}/run"],
     ["--j-star", "digits.parquet", "the unconditional floor, but the model is class-conditional"]),
    ("diagnose: an unconditional model against the class-conditional floor",
     [*DGB[:3], "--j-star", "{ws}/cond.parquet", *DGB[5:], "--model", "{ws}/same.pt", "--prediction", "x0"],
     ["--j-star", "cond.parquet", "a class-conditional floor", "has no class labels"]),
    ("fit: conditional models against the unconditional floor", ["fit", "--curves", "{ws}/run/loss_curve.parquet",
                                                                 "--j-star", "{ws}/digits.parquet", "--sigma", "0.5",
                                                                 "--out", "{out}.json"],
     ["--j-star", "the unconditional floor, but the model is class-conditional"]),
    ("sweep: --conditional against the unconditional floor", [*SW, "--out", "{out}", "--conditional", "--j-star",
                                                              "{ws}/digits.parquet"],
     ["--j-star", "the unconditional floor, but the model is class-conditional"]),
]
WHOLE = ["--tracking-uri", "sqlite:///{ws}/ok.db"]  # the normal smoke budget: all the digits, as the tables
STUDY_ROWS += [
    ("scaling_imagenet512", "conditional models against the unconditional floor",
     [*WHOLE, "--j-star", "{ws}/digits.parquet", "--out", "{out}"],
     ["--j-star", "the unconditional floor, but the model is class-conditional"]),
    ("scaling_imagenet512", "--unconditional with the class-conditional floor",
     [*WHOLE, "--unconditional", "--j-star", "{ws}/cond.parquet", "--out", "{out}"],
     ["--j-star", "a class-conditional floor", "has no class labels"]),
]
# studyfid (issue 21): the scaling study's sample-quality stage refuses its flags before any work
STUDY_ROWS += [
    ("scaling_imagenet512", "--features: a network file that is missing",
     [*SCALING, "--features", "network:{ws}/missing.pt", "--out", "{out}"], ["--features", "missing.pt", "not found"]),
    ("scaling_imagenet512", "--features: not a spec", [*SCALING, "--features", "bogus", "--out", "{out}"],
     ["--features", "pixels[:K]", "'bogus'"]),
    ("scaling_imagenet512", "--fd-samples 0", [*SCALING, "--features", "pixels:8", "--fd-samples", "0", "--out", "{out}"],
     ["--fd-samples", ">= 2"]),
    ("scaling_imagenet512", "--fd-seeds 0", [*SCALING, "--features", "pixels:8", "--fd-seeds", "0", "--out", "{out}"],
     ["--fd-seeds", ">= 1"]),
    ("scaling_imagenet512", "--fd-samples without --features", [*SCALING, "--fd-samples", "64", "--out", "{out}"],
     ["--fd-samples", "only with --features"]),
]

# evallatent (issue 21): latent models in evaluate: decoded by --vae, whose decoded images must be the reference's
EVS = ["--reference-stats", "{ws}/digits.stats.npz", "--features", "pixels:2", "--out", "{out}"]
CLI_ROWS += [
    ("evaluate: a latent model without --vae", ["evaluate", "--model", "{ws}/latentrun", *EVS],
     ["--model", "latentrun", "a latent model", "(4, 8, 8)", "give --vae DIR"]),
    ("evaluate: an EDM2 latent snapshot without --vae", ["evaluate", "--model", "{ws}/latent-snapshot.pkl", *EVS],
     ["--model", "latent-snapshot.pkl", "a latent model", "(4, 8, 8)", "give --vae DIR"]),
    ("evaluate: --vae with a pixel model", [*EV, "--out", "{out}", "--vae", "{ws}/vae"],
     ["--vae", "decodes 4-channel latents", "is a pixel model", "(1, 8, 8)"]),
    ("evaluate: decoded images of another shape than the reference's",
     ["evaluate", "--model", "{ws}/latentrun", "--vae", "{ws}/vae", *EVS],
     ["--vae", "to images of shape (3, 16, 16)", "digits.stats.npz", "images of shape (1, 8, 8)"]),
    ("evaluate: --latent-stats without --vae", [*EV, "--out", "{out}", "--latent-stats", "{ws}/other.npy"],
     ["--latent-stats", "only with --vae"]),
    ("evaluate: --latent-stats of images", ["evaluate", "--model", "{ws}/latentrun", "--vae", "{ws}/vae",
                                            "--latent-stats", "{ws}/rgb16", *EVS],
     ["--latent-stats", "rgb16", "expected a latent set"]),
    ("evaluate: --vae for --samples", ["evaluate", "--samples", "{ws}/rgb16", "--vae", "{ws}/vae", *EVS],
     ["--vae", "only with --model"]),
    ("evaluate: --vae with --reference", ["evaluate", "--reference", "--data", D, "--features", "pixels:2", "--vae",
                                          "{ws}/vae", "--out", "{out}.npz"], ["--vae", "not with --reference"]),
]

# crn (issue 22, items 1-2): a query budget and a precision target
CLI_ROWS += [
    ("estimate: --queries 0", [*E, "--out", "{out}.parquet", "--queries", "0"], ["--queries", ">= 1", "got 0"]),
    ("estimate: --queries above K·N", [*E, "--out", "{out}.parquet", "--queries", "5392"],
     ["--queries", "at most K·N = 3·1797 = 5391", "raise K"]),
    ("estimate: a target the budget cannot meet",
     [*E, "--out", "{out}.parquet", "--estimator", "exact", "--queries", "40", "--rel-error", "0.001"],
     ["--rel-error", "0.001 not met", "all 40 queries", "raise the budget"]),
    ("estimate: --conditional with --queries", [*E, "--out", "{out}.parquet", "--conditional", "--queries", "100"],
     ["--queries", "class-conditional floor", "--queries-per-sample"]),
]


# studylatent (issue 21): the scaling study's quality stage on latent data needs --vae and --reference-stats
LATENT_STUDY = [*SCALING, "--preset", "smoke", "--data", "{ws}/latents.npy", "--features", "pixels:2"]
STUDY_ROWS += [
    ("scaling_imagenet512", "latent data with --features but no --vae",
     [*LATENT_STUDY, "--reference-stats", "{ws}/digits.stats.npz", "--out", "{out}"],
     ["--vae", "latent data", "latents.npy", "4 channels"]),
    ("scaling_imagenet512", "latent data with --features but no --reference-stats",
     [*LATENT_STUDY, "--vae", "{ws}/vae", "--out", "{out}"],
     ["--reference-stats", "latent data", "lossfloor evaluate --reference --data IMAGES"]),
    ("scaling_imagenet512", "--vae with pixel data",
     [*SCALING, "--features", "pixels:2", "--vae", "{ws}/vae", "--out", "{out}"],
     ["--vae", "only for latent data", "(1, 8, 8)"]),
    ("scaling_imagenet512", "--reference-stats of other data than --data",
     [*SCALING, "--preset", "smoke", "--data", "{ws}/other.npy", "--features", "pixels:2", "--reference-stats",
      "{ws}/digits.stats.npz", "--out", "{out}"], ["--reference-stats", "digits.stats.npz", "statistics of other data"]),
]


# params (issue 23): the training parametrisations: --process names a preconditioning table, and a run folder
# trained in one parametrisation is not continued in another
CLI_ROWS += [
    ("train: unknown --process", [*TR, "--out", "{out}", "--process", "ve"],
     ["--process", "'ve'", "'ncsn'", "'ddpm-eps'", "'vp-v'"]),
    ("train: resume a run in another --process", ["train", "--data", D, "--images", "32", "--batch", "32",
                                                  "--eval-samples", "8", "--eval-sigmas", "0.5", "--process", "ncsn",
                                                  "--out", "{ws}/run"],
     ["resume", "run", "process: checkpoint 'edm', config 'ncsn'"]),
]

def _argv(argv, ws, out):
    return [a.format(ws=ws, out=out) for a in argv]


def _check(code, err, words, out: Path, t0: float):
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    left = [p for p in out.parent.glob(out.name + "*")]
    assert not left, f"left behind: {left}"
    assert time.monotonic() - t0 < 30, "refused only after work"  # checked before any expensive work


@pytest.mark.parametrize(("case", "argv", "words"), CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_every_command_refuses_bad_input_in_one_line(ws, tmp_path, capsys, case, argv, words):
    if not (ws / "c.parquet").exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"model": ["a", "b", "c"], "flops": [1.0, 2.0, 4.0], "loss": [0.9, 0.8, 0.7]}),
                       ws / "c.parquet")
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, _, err = cli(_argv(argv, ws, out), capsys)
    _check(code, err, words, out, t0)


@pytest.mark.parametrize(("study", "case", "argv", "words"), STUDY_ROWS, ids=[f"{r[0]}: {r[1]}" for r in STUDY_ROWS])
def test_every_study_refuses_bad_input_in_one_line(ws, tmp_path, capsys, study, case, argv, words):
    out = tmp_path / "out"
    t0 = time.monotonic()
    try:
        code = _study(study)(_argv(argv, ws, out))
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    _check(code, err, words, out, t0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("case", "env", "argv", "words"), ENV_ROWS, ids=[r[0] for r in ENV_ROWS])
def test_a_bad_environment_is_refused_in_one_line(ws, tmp_path, capsys, monkeypatch, case, env, argv, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, _, err = cli(_argv(argv, ws, out), capsys)
    _check(code, err, words, out, t0)
    assert not list(tmp_path.glob("lossfloor-work-*"))  # no work folder of the Ray engine


def test_a_failed_training_leaves_no_empty_run_folder(tmp_path, capsys):
    labels_out = tmp_path / "new" / "run"
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "bad_labels.npz", x=x, labels=np.full(64, 99))  # labels outside the preset's classes
    code, _, err = cli(["train", "--data", str(tmp_path / "bad_labels.npz"), "--images", "64", "--batch", "32",
                        "--eval-samples", "8", "--out", str(labels_out)], capsys)
    assert code == 2 and "labels" in err, err
    assert not (tmp_path / "new").exists()  # the folders this run made are gone; nothing else was there


def test_a_training_refused_after_the_store_is_opened_leaves_no_store(tmp_path, capsys):
    # trainfix: the data's labels are checked by the loop, after --mlflow's store is opened (issue 19: a 0-byte store)
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "bad_labels.npz", x=x, labels=np.full(64, 99))
    db = tmp_path / "store" / "mlflow.db"
    code, _, err = cli(["train", "--data", str(tmp_path / "bad_labels.npz"), "--images", "64", "--batch", "32",
                        "--eval-samples", "8", "--out", str(tmp_path / "run"), "--mlflow", "--tracking-uri",
                        f"sqlite:///{db}"], capsys)
    assert code == 2 and "labels" in err, err
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


def test_missing_parent_folders_of_outputs_are_made(ws, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "j.parquet"
    code, _, err = cli(["estimate", "--data", D, "--sigmas", "1", "--out", str(out)], capsys)
    assert code == 0 and out.is_file(), err
    shards = tmp_path / "c" / "d"
    code, _, err = cli(["data", "prepare", str(ws / "other.npy"), "--out", str(shards)], capsys)
    assert code == 0 and shards.is_dir(), err
