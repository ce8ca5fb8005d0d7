"""`lossfloor estimate` (local engine): bad input exits 2 with one line and writes nothing; the table,
the JSON rows, and the resumable work folder (`--work-dir`, lossfloor.floor.resume)."""

import json
import math
import sys
import types

import numpy as np
import pyarrow.parquet as pq
import pytest

from cli_run import cli
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, batch_terms, estimate, prepare_data, query_plan
from lossfloor.floor.resume import KEY_FILE, PartialStore, work_key
from lossfloor.floor.table import REQUIRED_COLUMNS

TABLE_COLUMNS = [
    "sigma", "j_star", "stderr", "bias", "ci_low", "ci_high", "j_star_x0", "stderr_x0", "bias_x0", "ci_low_x0",
    "ci_high_x0", "estimator", "target", "latents", "n_queries", "subset_size", "queries_per_sample", "seed", "c",
    "total_variance", "dataset_fingerprint",
]


@pytest.fixture
def npy(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npy"
    np.save(path, rng.normal(size=(50, 3)).astype(np.float32))
    return path


def run_args(data, out, *extra):
    return ["estimate", "--data", str(data), "--sigmas", "0.2,1,5", "--out", str(out), *extra]


def bad_inputs(tmp_path, npy):
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY garbage")
    one = tmp_path / "one.npy"
    np.save(one, np.zeros((1, 3), np.float32))
    nan = tmp_path / "nan.npy"
    arr = np.ones((10, 3), np.float32)
    arr[3, 1] = np.nan
    np.save(nan, arr)
    return {
        "missing file": (tmp_path / "nope.npy", []),
        "corrupt file": (corrupt, []),
        "one sample": (one, []),
        "nan": (nan, []),
        "sigma zero": (npy, ["--sigmas", "0,1"]),
        "sigma negative": (npy, ["--sigmas=-1,1"]),
        "sigma not a number": (npy, ["--sigmas", "a,b"]),
        "sigma grid": (npy, ["--sigma-grid", "1:0.1:5"]),
        "L below 2": (npy, ["--subset-size", "1"]),
        "L above N": (npy, ["--subset-size", "51"]),
        "L not an int": (npy, ["--subset-size", "x"]),
        "C zero": (npy, ["--c", "0"]),
        "C negative": (npy, ["--c", "-2"]),
        "C nan": (npy, ["--c", "nan"]),
        "unknown estimator": (npy, ["--estimator", "magic"]),
        "unknown target": (npy, ["--target", "velocityx"]),
        "unknown engine": (npy, ["--engine", "spark"]),
        "ray flag on local": (npy, ["--workers", "2"]),
        "queries per sample": (npy, ["--queries-per-sample", "0"]),
        "rows per batch": (npy, ["--rows-per-batch", "0"]),
        "ray workers": (npy, ["--engine", "ray", "--workers", "0"]),
        "ray cuda without gpus": (npy, ["--engine", "ray", "--device", "cuda"]),
        "ray address nobody listens on": (npy, ["--engine", "ray", "--address", "127.0.0.1:1"]),
        "ray address malformed": (npy, ["--engine", "ray", "--address", "nonsense"]),
        "seed negative": (npy, ["--seed=-1"]),
        "rel-error zero": (npy, ["--rel-error", "0"]),
        "rel-error above 1": (npy, ["--rel-error", "1.5"]),
        "rel-error the budget cannot meet": (npy, ["--estimator", "exact", "--rel-error", "0.001"]),
        "unknown index": (npy, ["--estimator", "knn", "--index", "kdtree"]),
        "index-pca zero": (npy, ["--estimator", "knn", "--index-pca", "0"]),
        "unknown latents": (npy, ["--latents", "sample"]),
        "posterior of non-latents": (npy, ["--latents", "posterior"]),
        "queries zero": (npy, ["--queries", "0"]),
        "queries above K·N": (npy, ["--queries", "151"]),
        "knn L below 4": (npy, ["--estimator", "knn", "--subset-size", "3"]),
    }


CASES = [
    "missing file", "corrupt file", "one sample", "nan", "sigma zero", "sigma negative", "sigma not a number",
    "sigma grid", "L below 2", "L above N", "L not an int", "C zero", "C negative", "C nan", "unknown estimator",
    "unknown target", "unknown engine", "ray flag on local", "queries per sample", "rows per batch",
    "ray workers", "ray cuda without gpus", "ray address nobody listens on", "ray address malformed",
    "seed negative", "rel-error zero", "rel-error above 1", "rel-error the budget cannot meet", "unknown index", "index-pca zero",
    "unknown latents", "posterior of non-latents", "queries zero", "queries above K·N", "knn L below 4",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, npy, capsys):
    data, extra = bad_inputs(tmp_path, npy)[case]
    argv = run_args(data, tmp_path / "out.parquet")
    if any(a.startswith(("--sigmas", "--sigma-grid")) for a in extra):
        argv = argv[:3] + argv[5:]  # replace the default grid
    code, out, err = cli([*argv, *extra], capsys)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.parquet").exists()
    assert not list(tmp_path.glob("lossfloor-work-*"))


def test_error_names_the_flag_or_file(tmp_path, npy, capsys):
    _, _, err = cli(run_args(npy, tmp_path / "o.parquet", "--subset-size", "51"), capsys)
    assert "--subset-size" in err and "50" in err
    _, _, err = cli(run_args(tmp_path / "nope.npy", tmp_path / "o.parquet"), capsys)
    assert "nope.npy" in err
    _, _, err = cli(run_args(npy, tmp_path / "o.parquet", "--c", "0"), capsys)
    assert "--c" in err
    (tmp_path / "a-file").write_text("x")
    _, _, err = cli(run_args(npy, tmp_path / "a-file" / "o.parquet"), capsys)
    assert "--out" in err and "a-file is a file" in err
    code, _, _ = cli(run_args(npy, tmp_path / "missing" / "o.parquet"), capsys)  # missing parents are made
    assert code == 0 and (tmp_path / "missing" / "o.parquet").is_file()


def test_writes_documented_table(tmp_path, npy, capsys):
    out = tmp_path / "jstar.parquet"
    code, stdout, _ = cli(run_args(npy, out, "--estimator", "cdol", "--subset-size", "16", "--seed", "3"), capsys)
    assert code == 0 and f"wrote {out}" in stdout
    table = pq.read_table(out)
    assert table.column_names == TABLE_COLUMNS and set(REQUIRED_COLUMNS) <= set(table.column_names)
    assert table.num_rows == 3
    assert table.column("estimator").to_pylist() == ["cdol"] * 3
    assert table.column("subset_size").to_pylist() == [16] * 3
    expected = estimate(np.load(npy), [0.2, 1, 5], EstimatorConfig(estimator="cdol", subset_size=16, seed=3),
                        progress=False)
    for name in ("j_star", "stderr", "bias", "ci_low", "ci_high"):
        np.testing.assert_allclose(table.column(name).to_numpy(), getattr(expected, name), rtol=1e-12)
    assert "ci_low..ci_high: 95% interval" in stdout and "bias" in stdout.splitlines()[0]


def test_json_prints_a_strict_json_list(tmp_path, npy, capsys):
    code, stdout, _ = cli(run_args(npy, tmp_path / "o.parquet", "--estimator", "snis", "--subset-size", "20",
                                   "--target", "eps", "--json"), capsys)
    assert code == 0
    rows = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert isinstance(rows, list) and len(rows) == 3
    assert [r["sigma"] for r in rows] == [0.2, 1.0, 5.0]
    assert rows[0]["target"] == "eps" and rows[0]["c"] == "inf" and math.isinf(float(rows[0]["c"]))


def test_local_engine_writes_no_work_dir_unless_asked(tmp_path, npy, capsys):
    code, _, _ = cli(run_args(npy, tmp_path / "o.parquet"), capsys)
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "o.parquet"]


def test_local_work_dir_resumes_and_guards_its_key(tmp_path, npy, capsys):
    work = tmp_path / "work"
    args = run_args(npy, tmp_path / "a.parquet", "--rows-per-batch", "5", "--subset-size", "10", "--json",
                    "--work-dir", str(work))
    code, first, _ = cli(args, capsys)
    assert code == 0 and (work / KEY_FILE).is_file()
    code, again, _ = cli(args, capsys)
    assert code == 0 and again == first
    code, plain, _ = cli([a for a in args if a not in ("--work-dir", str(work))], capsys)
    assert code == 0 and json.loads(plain) == json.loads(first)
    # the same folder for another estimate is refused, naming the folder
    code, _, err = cli([*args, "--seed", "9"], capsys)
    assert code == 2 and str(work) in err and "seed" in err


def test_mlflow_logs_the_table_with_params_from_the_driver(tmp_path, npy, capsys, monkeypatch):
    calls = []

    def log_estimate(table, *, params, experiment="optimal-loss", run_name=None, parent_run_id=None,
                     tracking_uri=None, also=(), figure_html=None):
        calls.append((table, params, experiment, run_name))
        return "run-123"

    monkeypatch.setitem(sys.modules, "lossfloor.tracking", types.SimpleNamespace(
        log_estimate=log_estimate, check_store=lambda uri: uri or "sqlite:///x.db"))
    code, _, _ = cli(run_args(npy, tmp_path / "o.parquet", "--estimator", "cdol", "--subset-size", "10", "--seed", "4",
                              "--mlflow", "--mlflow-experiment", "exp", "--run-name", "r1"), capsys)
    assert code == 0
    ((table, params, experiment, run_name),) = calls
    assert (experiment, run_name) == ("exp", "r1") and table.table.num_rows == 3
    assert params["dataset_fingerprint"] == table.rows()[0]["dataset_fingerprint"] != ""
    assert {k: params[k] for k in ("estimator", "subset_size", "queries_per_sample", "seed", "sigma_grid",
                                   "engine", "target")} == {
        "estimator": "cdol", "subset_size": 10, "queries_per_sample": 3, "seed": 4, "sigma_grid": "0.2,1,5",
        "engine": "local", "target": "x0"}
    assert params["c"] == pytest.approx(4 * 50 / 10)


def test_mlflow_unavailable_fails_before_any_work(tmp_path, npy, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lossfloor.tracking", None)  # import fails
    code, _, err = cli(run_args(npy, tmp_path / "o.parquet", "--mlflow"), capsys)
    assert code == 2 and "--mlflow" in err and not (tmp_path / "o.parquet").exists()


def test_work_dir_must_be_a_work_folder(tmp_path, npy, capsys):
    code, _, err = cli(run_args(npy, tmp_path / "o.parquet", "--work-dir", str(tmp_path)), capsys)
    assert code == 2 and "not a lossfloor work folder" in err and not (tmp_path / "o.parquet").exists()


# -- the work-folder store behind --work-dir (lossfloor.floor.resume) -----------------------------

def test_resume_computes_only_missing_batches(tmp_path):
    x = np.random.default_rng(1).normal(size=(80, 4)).astype(np.float32)
    cfg = EstimatorConfig(estimator="dol", subset_size=12, rows_per_batch=20, seed=4)  # 12 batches of 2 blocks
    full = estimate(x, [0.1, 1.0], cfg, progress=False)
    seen = []

    def stop(part):
        seen.append(part.batch_index)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        estimate(x, [0.1, 1.0], cfg, work_dir=tmp_path / "w", progress=False, on_batch=stop)
    run = estimate(x, [0.1, 1.0], cfg, work_dir=tmp_path / "w", progress=False)
    assert (run.reused, run.computed) == (4, 8)
    np.testing.assert_array_equal(run.j_star, full.j_star)
    np.testing.assert_array_equal(run.stderr, full.stderr)


def test_store_survives_debris_and_keeps_file_count_bounded(tmp_path):
    x = np.random.default_rng(2).normal(size=(60, 3)).astype(np.float32)
    cfg = EstimatorConfig(estimator="exact", rows_per_batch=3, seed=0)  # 60 batches
    full = estimate(x, [0.5, 2.0], cfg, progress=False)
    resolved = cfg.resolve(60, 3)
    key = work_key(resolved, fingerprint="f", sigmas=[0.5, 2.0], n_samples=60, dim=3)
    xt = prepare_data(x, resolved)
    plan = query_plan(resolved, 60)
    # many tiny parts (as after many interrupted runs), a temporary file of a killed write, a damaged part
    with PartialStore(tmp_path / "w", key, flush_every=1, max_parts=100) as store:
        for b in range(40):
            store.add(batch_terms(xt, np.array([0.5, 2.0]), resolved, plan, b))
    (tmp_path / "w" / ".tmp-part-x.npz").write_bytes(b"half")
    damaged = sorted((tmp_path / "w").glob("part-*.npz"))[0]
    damaged.write_bytes(b"not a zip")
    assert len(list((tmp_path / "w").glob("part-*.npz"))) == 40
    with PartialStore(tmp_path / "w", key, max_parts=8) as store:
        assert len(store.done) == 39  # the damaged part's batch is recomputed
        assert len(list((tmp_path / "w").glob("part-*.npz"))) == 1  # merged
        assert not list((tmp_path / "w").glob(".tmp-*"))
    run = estimate(x, [0.5, 2.0], cfg, fingerprint="f", work_dir=tmp_path / "w", progress=False)
    assert (run.reused, run.computed) == (39, 21)
    np.testing.assert_array_equal(run.j_star, full.j_star)
    np.testing.assert_array_equal(run.stderr, full.stderr)


def test_store_merges_parts_while_it_runs(tmp_path):
    x = np.random.default_rng(3).normal(size=(40, 2)).astype(np.float32)
    cfg = EstimatorConfig(estimator="exact", rows_per_batch=3).resolve(40, 2)  # 40 batches
    key = work_key(cfg, fingerprint="f", sigmas=[1.0], n_samples=40, dim=2)
    xt, plan = prepare_data(x, cfg), query_plan(cfg, 40)
    with PartialStore(tmp_path, key, flush_every=1, max_parts=8) as store:
        for b in range(40):
            store.add(batch_terms(xt, np.array([1.0]), cfg, plan, b))
            assert len(list(tmp_path.glob("part-*.npz"))) <= 9
    with PartialStore(tmp_path, key) as store:
        assert sorted(store.done) == list(range(40))


def test_store_is_locked_while_in_use(tmp_path):
    cfg = EstimatorConfig(estimator="dol", subset_size=8, rows_per_batch=2).resolve(20, 2)
    key = work_key(cfg, fingerprint="f", sigmas=[1.0], n_samples=20, dim=2)
    with PartialStore(tmp_path, key), pytest.raises(InputError, match="in use"):
        PartialStore(tmp_path, key).__enter__()
