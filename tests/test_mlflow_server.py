"""The cluster's tracking server, for real: a PostgreSQL made with initdb in a temporary folder, the MLflow
server of cluster/mlflow/serve.sh on a free local port in front of it, and WRITERS concurrent Ray tasks,
each one run through lossfloor.tracking (params, STEPS metric steps of two keys in CALLS calls, the data set as an input,
an artifact): nothing lost, nothing counted twice. The same writers on one sqlite file are reported (what
failed, what was lost, how long it took), not asserted: that is the case the server exists for.

Needs PostgreSQL's server programs: `bash scripts/setup_postgres.sh` (`make test-e2e` runs it). With
LOSSFLOOR_BENCH_OUT=FILE.json the measurements are written there too (benchmarks/results/ holds one).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from lossfloor.tracking import client, experiment_id
from lossfloor.tracking.datasets import DIGEST_CHARS
from services import free_port, stop, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]

REPO = Path(__file__).resolve().parents[1]
WRITERS = 8
STEPS = 500  # metric steps per writer, each with KEYS: STEPS x len(KEYS) values per run
CALLS = 50  # ... sent in this many calls (log_series of STEPS / CALLS steps): 8 x 50 writes at once
KEYS = ("loss", "lr")
PARAMS = 20
EXPERIMENT = "concurrent-writers"
FINGERPRINT = "ab" * 32  # a data fingerprint (sha256 hex), as every run of a study on one data set has
SERVER_START_S = 120  # the first start creates ~40 tables


def _pg_program(name: str) -> str | None:
    """Debian keeps the server programs in /usr/lib/postgresql/VERSION/bin (the newest wins), not on PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    """postgresql://mlflow@127.0.0.1:PORT/mlflow: a fresh cluster in a temporary folder (trust auth on
    127.0.0.1 only, its unix socket in that folder), run as `postgres` when the tests run as root."""
    programs = {n: _pg_program(n) for n in ("initdb", "pg_ctl", "createdb")}
    if None in programs.values():
        pytest.fail("PostgreSQL's server programs are missing: run `bash scripts/setup_postgres.sh` "
                    "(make test-e2e does)")
    root = Path(tempfile.mkdtemp(prefix="lossfloor-pg-"))  # not under pytest's root-only tmp folders
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*args):
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"

    pg(programs["initdb"], "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
    pg(programs["pg_ctl"], "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", "60", "-o",
       f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        pg(programs["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, programs["pg_ctl"], "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """http://127.0.0.1:PORT: `bash cluster/mlflow/serve.sh` on the PostgreSQL, artifacts in a folder."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres, "MLFLOW_ARTIFACTS_DESTINATION": str(tmp / "artifacts"),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "2",
           "MLFLOW": str(Path(sys.executable).with_name("mlflow"))}
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow" / "serve.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, SERVER_START_S, "serve.sh")
        yield url
    finally:
        stop(proc)


def _value(writer: int, step: int) -> float:
    return writer + step / STEPS


def _write(uri: str, writer: int, artifact_dir: str) -> dict:
    """One writer (a Ray task): a run with PARAMS params, the data set as input, STEPS metric steps in CALLS
    calls and an artifact, all through lossfloor.tracking. A failed call is counted, and the writer goes on."""
    from lossfloor.tracking import start_run
    from lossfloor.tracking.datasets import log_dataset

    errors: list[str] = []

    def attempt(fn, *args, **kw):
        try:
            fn(*args, **kw)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")

    t0, started, run_id = time.perf_counter(), time.time(), None
    try:
        with start_run(experiment=EXPERIMENT, run_name=f"writer-{writer}", tracking_uri=uri) as run:
            run_id = run.run_id
            attempt(run.log_params, {f"p{j:02d}": writer * 1000 + j for j in range(PARAMS)})
            attempt(log_dataset, run, FINGERPRINT, source="writers", context="training")
            per_call = STEPS // CALLS
            for call in range(CALLS):
                steps = range(call * per_call, (call + 1) * per_call)
                attempt(run.log_series, {"loss": [_value(writer, s) for s in steps],
                                         "lr": [1.0 / (s + 1) for s in steps]}, steps=list(steps))
            path = Path(artifact_dir) / f"writer-{writer}.txt"
            path.write_text(f"writer {writer}\n", encoding="utf-8")
            attempt(run.log_artifact, path)
    except Exception as e:  # the run could not be created or ended
        errors.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
    return {"writer": writer, "run_id": run_id, "seconds": time.perf_counter() - t0, "errors": errors,
            "span": (started, time.time())}


def _run_writers(uri: str, artifact_dir: Path) -> tuple[list[dict], float]:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not have tests/
    task = ray.remote(num_cpus=2 / WRITERS, max_retries=0)(_write)  # all WRITERS at once on 2 CPUs
    t0 = time.perf_counter()
    results = ray.get([task.remote(uri, w, str(artifact_dir)) for w in range(WRITERS)], timeout=600)
    return results, time.perf_counter() - t0


def _audit(uri: str, results: list[dict], tmp: Path) -> dict:
    """What the store holds against what each writer sent: lost and duplicated metric values (per run,
    key and step), wrong values, missing params, artifacts and inputs, and the writers' own errors."""
    c = client(uri)
    lost = duplicated = wrong = params_missing = artifacts_missing = inputs_missing = 0
    for r in results:
        if r["run_id"] is None:
            lost += STEPS * len(KEYS)
            params_missing, artifacts_missing, inputs_missing = params_missing + PARAMS, artifacts_missing + 1, inputs_missing + 1
            continue
        for key in KEYS:
            history = c.get_metric_history(r["run_id"], key)
            seen = Counter(m.step for m in history)
            lost += sum(1 for s in range(STEPS) if seen[s] == 0)
            duplicated += sum(n - 1 for n in seen.values() if n > 1)
            if key == "loss":
                wrong += sum(1 for m in history if m.value != _value(r["writer"], m.step))
        run = c.get_run(r["run_id"])
        params_missing += PARAMS - sum(1 for k in run.data.params if k.startswith("p"))
        inputs = run.inputs.dataset_inputs
        inputs_missing += 0 if [i.dataset.digest for i in inputs] == [FINGERPRINT[:DIGEST_CHARS]] else 1
        name = f"writer-{r['writer']}.txt"
        try:
            local = c.download_artifacts(r["run_id"], name, str(tmp))
            ok = Path(local).read_text(encoding="utf-8") == f"writer {r['writer']}\n"
        except Exception:
            ok = False
        artifacts_missing += 0 if ok else 1
    errors = [e for r in results for e in r["errors"]]
    seconds = [r["seconds"] for r in results]
    events = sorted([(a, 1) for a, _ in (r["span"] for r in results)] + [(b, -1) for _, b in (r["span"] for r in results)])
    running = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
    return {
        "writers": WRITERS, "metric_steps_per_writer": STEPS, "metric_calls_per_writer": CALLS, "metric_values_per_writer": STEPS * len(KEYS),
        "params_per_writer": PARAMS, "runs_created": sum(r["run_id"] is not None for r in results),
        "lost": lost, "duplicated": duplicated, "wrong_values": wrong, "params_missing": params_missing,
        "artifacts_missing": artifacts_missing, "inputs_missing": inputs_missing,
        "failed_calls": len(errors), "errors": dict(Counter(errors).most_common(3)),
        "writer_seconds_mean": round(sum(seconds) / len(seconds), 2), "writer_seconds_max": round(max(seconds), 2),
        "most_writers_at_once": max(running),
    }


@pytest.fixture(scope="module")
def report():
    """Both stores' measurements, printed at the end (and written to $LOSSFLOOR_BENCH_OUT when set)."""
    stores: dict[str, dict] = {}
    yield stores
    import mlflow
    import ray

    result = {"benchmark": "mlflow_concurrent_writers", "date": datetime.date.today().isoformat(),
              "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "mlflow": mlflow.__version__,
              "ray": ray.__version__, "writers_as": f"Ray tasks, {WRITERS} at once on 2 CPUs", "stores": stores}
    text = json.dumps(result, indent=2)
    print("\n" + text)
    if os.environ.get("LOSSFLOOR_BENCH_OUT"):
        Path(os.environ["LOSSFLOOR_BENCH_OUT"]).write_text(text + "\n", encoding="utf-8")


def test_a_tracking_server_on_postgresql_loses_nothing(server, postgres, report, tmp_path):
    (tmp_path / "out").mkdir()
    experiment_id(client(server), EXPERIMENT)  # created once up front, as a study's driver does
    results, wall = _run_writers(server, tmp_path / "out")
    audit = _audit(server, results, tmp_path)
    report["postgresql via mlflow server"] = {**audit, "wall_seconds": round(wall, 2),
                                              "metric_values_per_second": round(WRITERS * STEPS * len(KEYS) / wall)}
    assert audit["failed_calls"] == 0, audit["errors"]
    assert audit["runs_created"] == WRITERS and audit["most_writers_at_once"] >= 2
    assert (audit["lost"], audit["duplicated"], audit["wrong_values"]) == (0, 0, 0)
    assert (audit["params_missing"], audit["artifacts_missing"], audit["inputs_missing"]) == (0, 0, 0)
    statuses = {client(server).get_run(r["run_id"]).info.status for r in results}
    assert statuses == {"FINISHED"}
    # the runs are in PostgreSQL itself, not in some other store the server fell back to
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres)
    with engine.connect() as con:
        n = con.execute(sqlalchemy.text("SELECT count(*) FROM metrics WHERE key = 'loss'")).scalar()
    engine.dispose()
    assert n == WRITERS * STEPS


def test_the_same_writers_on_one_sqlite_file_are_reported(report, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id(client(uri), EXPERIMENT)  # the tables made once, before the writers race
    (tmp_path / "out").mkdir()
    results, wall = _run_writers(uri, tmp_path / "out")
    audit = _audit(uri, results, tmp_path)
    report["one sqlite file"] = {**audit, "wall_seconds": round(wall, 2),
                                 "metric_values_per_second": round(WRITERS * STEPS * len(KEYS) / wall)}
    with capsys.disabled():
        print(f"\nsqlite, {WRITERS} concurrent writers: {audit['failed_calls']} failed calls, {audit['lost']} lost "
              f"and {audit['duplicated']} duplicated metric values, {wall:.1f} s; errors: {audit['errors']}")
    assert audit["runs_created"] + audit["failed_calls"] > 0  # it ran; what it did is the report
