"""A local Ray head with a job server, for the tests that submit studies as users do (`ray job submit`).

    env = job_env(tmp_path / "home")             # results land in HOME/lossfloor (cluster/runtime_env.yaml)
    with ray_head(env, tmp_path / "head.log") as url:
        subprocess.run([RAY, "job", "submit", "--address", url, ...], env=env, ...)

The head runs in a new session started here and is stopped by the ids of that session's processes,
never by `ray stop` (which ends every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")


def job_env(home: Path) -> dict[str, str]:
    """This process's environment for a job client and head: no outside Ray/MLflow settings, no token auth,
    HOME (where the job's results go) set to `home`, this environment's `ray` and `python` first on PATH."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LOSSFLOOR_RUNS_DIR")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HOME=str(home),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`, this one excepted."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def _stop_head(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while _session_pids(head.pid) and time.monotonic() < deadline:
            time.sleep(0.3)
        if not _session_pids(head.pid):
            break
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


@contextlib.contextmanager
def ray_head(env: dict, log_path: Path, timeout_s: float = 90.0):
    """A local Ray head with a job server (2 CPUs, free ports); yields its dashboard URL; stops only it."""
    temp_dir = tempfile.mkdtemp(prefix="lfhead-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client_port, agent = _free_ports(4)
    url = f"http://127.0.0.1:{dash}"
    with open(log_path, "w") as head_log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
             "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
             "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
             "--temp-dir", temp_dir, "--disable-usage-stats"],
            env={**env, "RAY_worker_niceness": "0"}, cwd=log_path.parent, stdout=head_log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray job server did not answer at {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
