"""Bad input, table-driven: every command and study refuses it before any work with exit 2 and one line
naming the flag or file, no traceback, and leaves nothing behind. A new flag gets its cases by adding rows.

Each row: (what it is, argv with {placeholders} for the files of the `ws` fixture, words the error line
must hold). The outputs a row names (`{out}...`) must not exist afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cli_run import cli

ROOT = Path(__file__).resolve().parent.parent
SPACE = str(ROOT / "studies" / "spaces" / "optimal_loss.yaml")
D = "bundled:digits"


def _study(name):
    sys.path.insert(0, str(ROOT / "studies"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Hostile files: a file where a folder should be, a corrupt MLflow database, NaN samples, a torn
    shard, a corrupt PNG in a folder and in a zip, mixed image sizes, and J* tables of two data sets."""
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
    # numbers (issue 19): digits J* tables with numbers that cannot be trusted, data without values
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = pq.read_table(t / "digits.parquet")
    pq.write_table(good.slice(0, 0), t / "empty.parquet")
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


def test_a_failed_training_leaves_no_empty_run_folder(tmp_path, capsys):
    labels_out = tmp_path / "new" / "run"
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "bad_labels.npz", x=x, labels=np.full(64, 99))  # labels outside the preset's classes
    code, _, err = cli(["train", "--data", str(tmp_path / "bad_labels.npz"), "--images", "64", "--batch", "32",
                        "--eval-samples", "8", "--out", str(labels_out)], capsys)
    assert code == 2 and "labels" in err, err
    assert not (tmp_path / "new").exists()  # the folders this run made are gone; nothing else was there


def test_missing_parent_folders_of_outputs_are_made(ws, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "j.parquet"
    code, _, err = cli(["estimate", "--data", D, "--sigmas", "1", "--out", str(out)], capsys)
    assert code == 0 and out.is_file(), err
    shards = tmp_path / "c" / "d"
    code, _, err = cli(["data", "prepare", str(ws / "other.npy"), "--out", str(shards)], capsys)
    assert code == 0 and shards.is_dir(), err
