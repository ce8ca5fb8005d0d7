"""MLflow runs through one explicit client: where runs go, and a run that always ends.

Every call names its run by id (no fluent "active run" state), so a driver can hold a parent run and
log children from the same process, and a Ray worker can log into a run it was handed by id.

Tracking URI: the `tracking_uri` argument (`--tracking-uri`), else MLFLOW_TRACKING_URI, else
`sqlite:///~/lossfloor/mlflow.db` (`$LOSSFLOOR_HOME/mlflow.db` when that is set): one place for the CLI,
the studies and their Ray jobs alike, whatever the working directory (the plain ./mlruns file store
errors since MLflow 3.13). `check_store` opens the store before any work: a corrupt database or a server
that does not answer is one line naming it, not a traceback after the computation. For a local sqlite
store the folder of the database file is created if missing, and a new experiment keeps
its artifacts next to the database (DB_FOLDER/mlartifacts/EXPERIMENT), not in ./mlruns of whatever
the working directory is: a Ray job's working directory is a temporary copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lossfloor.errors import InputError

log = logging.getLogger(__name__)

HOME_ENV = "LOSSFLOOR_HOME"  # where lossfloor keeps its default tracking database (default ~/lossfloor)
SERVER_TIMEOUT_S = 5.0  # how long check_store waits for a tracking server to answer
PARENT_RUN_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's limits per log_batch call
_SQLITE = re.compile(r"sqlite:///(?P<path>.+)")
# lossfloor's experiments are model-development experiments (runs with their metrics). The tag is what
# MLflow records for that; its 3.x UI does not decide its view by it (see `ui_link`).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def default_tracking_uri() -> str:
    """sqlite:///$LOSSFLOOR_HOME/mlflow.db, $LOSSFLOOR_HOME defaulting to ~/lossfloor."""
    home = Path(os.environ.get(HOME_ENV) or Path.home() / "lossfloor").expanduser().absolute()
    return f"sqlite:///{home / 'mlflow.db'}"


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri`, else MLFLOW_TRACKING_URI, else `default_tracking_uri()`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file"):
        raise InputError(
            f"tracking URI {uri!r}: the plain file store is not supported by MLflow >= 3.13; "
            f"use a database like sqlite:///mlflow.db or a server like http://HOST:5000"
        )
    return uri


def _uri_source(uri: str | None, flag: str) -> str:
    """What an error about the store names: the flag, the environment variable or the default."""
    if uri:
        return flag
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking store"


def check_store(uri: str | None = None, *, flag: str = "--tracking-uri", must_exist: bool = False) -> str:
    """Resolve (`tracking_uri`) and open the tracking store before any work; the URI, or InputError.

    sqlite: the file, if present, must be an SQLite database (an MLflow one if it has tables), and its
    folder writable; must_exist: the file must be there (a reader such as the dashboard). http(s): the
    server must answer GET /health within SERVER_TIMEOUT_S (MLflow's client would retry for minutes).
    Other databases (postgresql://, mysql://): one connection through SQLAlchemy, with a timeout.
    A scheme MLflow has no store for (`store_schemes`) is refused here, not when the run is logged."""
    resolved = tracking_uri(uri)
    source = _uri_source(uri, flag)
    where = f"{source} {resolved}"
    scheme = resolved.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in store_schemes():
        raise InputError(f"{where}: MLflow has no tracking store for {scheme}:// "
                         f"(expected one of {', '.join(sorted(store_schemes()))})")
    db = sqlite_path(resolved)
    if db is not None:
        _check_sqlite(db, where, source, must_exist)
    elif scheme in ("http", "https"):
        _check_server(resolved, where)
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_database(resolved, where)
    return resolved


def store_schemes() -> frozenset[str]:
    """The URI schemes MLflow opens a tracking store for: its own (databases, servers, Databricks; not the
    plain file store, see `tracking_uri`) and those plugins register (entry points mlflow.tracking_store)."""
    from importlib.metadata import entry_points

    from mlflow.store.db.db_types import DATABASE_ENGINES

    plugins = {e.name for e in entry_points(group="mlflow.tracking_store")}
    return frozenset({*DATABASE_ENGINES, "http", "https", "databricks", *plugins})


def _check_sqlite(db: Path, where: str, source: str, must_exist: bool) -> None:
    import sqlite3

    from lossfloor.atomic import check_writable

    if not db.exists():
        if must_exist:
            raise InputError(f"{where}: no MLflow database at {db}")
        check_writable(db, source)
        return
    if not db.is_file():
        raise InputError(f"{where}: {db} is not a file")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=SERVER_TIMEOUT_S)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise InputError(f"{where}: {db} is not an SQLite database ({e})") from None
    if tables and "experiments" not in tables:
        raise InputError(f"{where}: {db} is an SQLite database but not an MLflow one (no experiments table)")
    if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
        raise InputError(f"{where}: {db} or its folder is not writable")


def _check_server(uri: str, where: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth layer may refuse /health); MLflow's own calls will tell
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"{where}: no tracking server answers within {SERVER_TIMEOUT_S:g} s ({reason})") from None


def _check_database(uri: str, where: str) -> None:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(SERVER_TIMEOUT_S)})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # drivers raise their own types (missing driver, refused, bad password)
        raise InputError(f"{where}: cannot connect ({str(e).splitlines()[0][:200]})") from None


def ui_link(experiment_id: str, run_id: str | None = None, *, address: str = UI_ADDRESS) -> str:
    """The MLflow UI page of an experiment's runs table (or of one run) in its model-training view.

    MLflow 3's UI chooses between its GenAI view (traces, "Detect Issues", runs as evaluations) and its
    model-training view from the page address's `workflowType` query parameter (genai | machine_learning),
    else from the browser's last choice, else GenAI; not from the experiment's tags. So every link
    lossfloor prints names the view (tests/test_mlflow_ui.py opens one in Chromium)."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{address}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def sigma_name(sigma: float) -> str:
    """σ in a metric name: 4 significant digits, no '+' (MLflow refuses it: 1e+06 -> 1e06)."""
    return f"{sigma:.4g}".replace("+", "")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory), else None."""
    m = _SQLITE.fullmatch(uri)
    if m is None or m["path"].startswith(":memory:"):
        return None
    return Path(m["path"].split("?", 1)[0]).absolute()


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient for `tracking_uri(uri)`; creates the folder of a local sqlite database."""
    uri = tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (safe when several processes race to create it)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise InputError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or pick another name")
        if EXPERIMENT_KIND[0] not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    db = sqlite_path(c.tracking_uri)
    location = None
    if db is not None:
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        location = (db.parent / "mlartifacts" / folder).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException:
        exp = c.get_experiment_by_name(name)  # another process created it first
        if exp is None:
            raise
        return exp.experiment_id


def finished_run(uri: str, experiment: str, tags: Mapping[str, str], *,
                 parent_run_id: str | None = None) -> str | None:
    """The id of the newest FINISHED run of `experiment` carrying every tag of `tags` (a child of
    `parent_run_id` when given), or None: what a rerun continues instead of logging the same run again."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        return None
    tags = {**tags, **({PARENT_RUN_TAG: parent_run_id} if parent_run_id is not None else {})}
    where = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'FINISHED'"])
    runs = c.search_runs([exp.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                         max_results=1)
    return runs[0].info.run_id if runs else None


def param_value(value) -> str:
    """A param as MLflow stores it: a string, lists/dicts as JSON, at most MAX_PARAM_CHARS characters."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    elif isinstance(value, (bool, numbers.Number)) or value is None:
        text = str(value)
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > MAX_PARAM_CHARS:
        text = text[: MAX_PARAM_CHARS - 3] + "..."
    return text


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run, addressed by id. Made by `start_run`; every method writes at once."""

    client: MlflowClient
    run_id: str
    experiment_id: str

    def log_params(self, params: Mapping[str, object]) -> None:
        items = [Param(str(k), param_value(v)) for k, v in params.items()]
        for part in _chunks(items, _BATCH["params"]):
            self.client.log_batch(self.run_id, params=part)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        """Scalar metrics at one step; non-finite values are skipped with a warning."""
        self.log_series({name: [value] for name, value in metrics.items()}, steps=[step])

    def log_series(self, series: Mapping[str, Sequence[float]], *, steps: Sequence[int] | None = None) -> None:
        """Metric histories: series[name][i] is logged at step steps[i] (default i)."""
        now = int(time.time() * 1000)
        items = []
        for name, values in series.items():
            for i, value in enumerate(values):
                value = float(value)
                if not math.isfinite(value):
                    log.warning("metric %s at step %d is %s: not logged", name, i, value)
                    continue
                items.append(Metric(name, value, now, int(steps[i]) if steps is not None else i))
        for part in _chunks(items, _BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=part)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        items = [RunTag(str(k), param_value(v)) for k, v in tags.items()]
        for part in _chunks(items, _BATCH["tags"]):
            self.client.log_batch(self.run_id, tags=part)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_html(self, page: str, artifact_file: str) -> None:
        """A finished HTML page (a figure drawn by `lossfloor.pages`) as the artifact `artifact_file`."""
        self.client.log_text(self.run_id, page, artifact_file)


def _default_tags(tags: Mapping[str, object] | None) -> dict[str, str]:
    """User tags plus MLflow's usual context tags (user, source script, git commit where known)."""
    from mlflow.tracking.context.registry import resolve_tags  # what mlflow.start_run adds

    try:
        base = resolve_tags({})
    except Exception as e:  # a context provider failing must not stop the run
        log.debug("mlflow context tags unavailable: %s", e)
        base = {}
    base.update({str(k): param_value(v) for k, v in (tags or {}).items()})
    return base


@contextlib.contextmanager
def start_run(
    *,
    experiment: str = "optimal-loss",
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, object] | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
) -> Iterator[TrackedRun]:
    """An MLflow run for the `with` block; it ends FINISHED, FAILED (an exception) or KILLED (^C).

    start_time, end_time (Unix seconds): the run's real span when it is logged after the fact (a
    training logged from its folder), so the UI's duration is the work's, not the logging's.
    parent_run_id: nest this run under that one (tag mlflow.parentRunId, how the UI groups children).
    tracking_uri: see `tracking_uri`; experiment: created if missing.
    run_id: continue this existing run (e.g. a resumed training) instead of creating one; it is marked
      RUNNING again and `experiment`, `run_name` and `parent_run_id` are ignored.
    """
    c = client(tracking_uri)
    if run_id is not None:
        try:
            exp_id = c.get_run(run_id).info.experiment_id
        except MlflowException:
            raise InputError(f"run_id: no run {run_id!r} in {c.tracking_uri}") from None
        c.update_run(run_id, status="RUNNING")
        if tags:
            c.log_batch(run_id, tags=[RunTag(str(k), param_value(v)) for k, v in tags.items()])
        tracked = TrackedRun(c, run_id, exp_id)
    else:
        exp_id = experiment_id(c, experiment)
        all_tags = _default_tags(tags)
        if parent_run_id is not None:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = c.create_run(exp_id, tags=all_tags, run_name=run_name,
                           start_time=None if start_time is None else int(start_time * 1000))
        tracked = TrackedRun(c, run.info.run_id, exp_id)
    try:
        yield tracked
    except BaseException as e:
        # Exception: FAILED; KeyboardInterrupt, SystemExit, GeneratorExit: KILLED
        _end(tracked, RunStatus.FAILED if isinstance(e, Exception) else RunStatus.KILLED, quiet=True)
        raise
    _end(tracked, RunStatus.FINISHED, quiet=False, end_time=end_time)


def _end(run: TrackedRun, status: int, *, quiet: bool, end_time: float | None = None) -> None:
    """Mark the run ended; quiet: only log a failure to do so (never hide the error that ended the run)."""
    try:
        run.client.set_terminated(run.run_id, RunStatus.to_string(status),
                                  end_time=None if end_time is None else int(end_time * 1000))
    except Exception as e:
        if not quiet:
            raise
        log.error("could not end MLflow run %s as %s: %s", run.run_id, RunStatus.to_string(status), e)
