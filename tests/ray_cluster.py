"""A real multi-node Ray cluster on one machine: a head and worker nodes started with `ray start
--address`, each in its own session, with its own custom resource so work can be forced onto it, and
killable as a whole node (SIGKILL to every process of its session: raylet, object store, workers).

    with MultiNode(tmp_path) as cluster:
        a = cluster.add_node("node_a")            # 1 CPU and resource {"node_a": 1}
        ray.init(address=cluster.address)
        ...
        cluster.kill(a)                            # the node dies mid-run
        cluster.add_node("node_c")                 # a replacement joins

Nothing here runs `ray stop` (which ends every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ray_head import RAY, _free_ports, _session_pids, _stop_head, job_env


class MultiNode:
    def __init__(self, folder: Path, head_cpus: int = 0):
        self.folder, self.head_cpus = Path(folder), head_cpus
        self.env = {**job_env(self.folder / "home"), "RAY_worker_niceness": "0"}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.temp_dir = tempfile.mkdtemp(prefix="lfmn-", dir="/tmp")  # Ray socket paths stay < 108 chars
        self.temp_dirs = [self.temp_dir]
        self.address = ""
        self.dashboard = ""  # http://127.0.0.1:PORT: the job server (`ray job submit --address`) and state API

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # open as long as the node lives
        ports = _free_ports(7)
        node = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
             "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
             "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
             "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
             "--num-gpus", "0", "--object-store-memory", str(200 * 2**20), *args],
            env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.nodes[name] = node
        return node

    def __enter__(self) -> MultiNode:
        gcs, dash = _free_ports(2)  # the dashboard serves the state API Ray Train's controller polls
        self._start("head", ["--head", "--port", str(gcs), "--include-dashboard=true", "--dashboard-host",
                             "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(self.head_cpus),
                             "--temp-dir", self.temp_dir])
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self._wait(lambda alive: len(alive) >= 1)
        return self

    def add_node(self, name: str, cpus: int = 1) -> str:
        """Start a worker node with `cpus` CPUs and resource {name: 1}; return when the cluster counts it."""
        # a temporary folder of its own, as on a machine of its own: nodes sharing the head's would share
        # one runtime_resources folder, and a node's runtime-env agent would replace a job's working_dir
        # under the running driver (its cwd gone: FileNotFoundError in os.getcwd)
        temp_dir = tempfile.mkdtemp(prefix="lfmn-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        self._start(name, ["--address", self.address, "--num-cpus", str(cpus),
                           "--resources", json.dumps({name: 1}), "--temp-dir", temp_dir])
        self._wait(lambda alive: name in alive)
        return name

    def kill(self, name: str) -> None:
        """The node dies at once: SIGKILL to every process of its session (no graceful shutdown)."""
        node = self.nodes.pop(name)
        for pid in _session_pids(node.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.wait(timeout=30)

    def alive(self) -> set[str]:
        """The custom resources (node names; "head" for the head) of the nodes the cluster counts alive,
        asked of the GCS by a short-lived client."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print('ALIVE', *sorted(k for n in ray.nodes() if n['Alive'] for k in n['Resources'] "
                "if k.startswith('node_')) or ['head'])")
        done = subprocess.run([str(Path(RAY).parent / "python"), "-c", code, self.address], env=self.env,
                              capture_output=True, text=True, timeout=120)
        found = re.findall(r"^ALIVE (.*)$", done.stdout, flags=re.M)  # Ray may print its own lines too
        return set(found[-1].split()) if done.returncode == 0 and found else set()

    def names(self) -> dict[str, str]:
        """Node id -> name (its custom resource, "head" for the head) of every node the cluster has had,
        dead ones included, from the state API."""
        from ray.util.state import list_nodes

        return {n.node_id: next((k for k in n.resources_total if k.startswith("node_")), "head")
                for n in list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)}

    def _wait(self, ok, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ok(self.alive()):
                return
            time.sleep(1.0)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.folder.glob("*.log"))
        raise RuntimeError(f"the Ray cluster at {self.address} did not reach the expected nodes:\n{logs}")

    def __exit__(self, *exc) -> None:
        for name in [n for n in self.nodes if n != "head"]:
            _stop_head(self.nodes.pop(name))
        if "head" in self.nodes:
            _stop_head(self.nodes.pop("head"))
        import shutil

        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
