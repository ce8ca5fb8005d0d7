"""The cluster files a user applies: the launcher YAMLs against Ray's own schema and config checks (what
`ray up` runs first), the pod templates of the KubeRay manifests and the tracking server's Deployment and
Service against the Kubernetes schemas (kubernetes-validate's bundled ones: offline, strict, so a typo in a
field name fails), and the RayJob against the README's `ray job submit` command and runtime_env.yaml."""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for
LAUNCHERS = sorted((CLUSTER / "launcher").glob("*.yaml"))


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod(template: dict, name: str) -> dict:
    """A pod template as the Pod it makes (what the Kubernetes schema of a Pod checks)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


def _validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


# --- cluster launcher ------------------------------------------------------------------------------------


def test_there_is_an_on_prem_and_a_cloud_gpu_launcher():
    configs = {p.name: yaml.safe_load(p.read_text()) for p in LAUNCHERS}
    providers = {c["provider"]["type"]: c for c in configs.values()}
    assert set(providers) == {"local", "aws"}, configs.keys()
    local = providers["local"]["provider"]
    assert local["head_ip"] and local["worker_ips"]
    gpu_types = {n: t for n, t in providers["aws"]["available_node_types"].items() if t["resources"].get("GPU")}
    assert len(gpu_types) >= 2 and all(t["max_workers"] > 0 for t in gpu_types.values())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_schema_and_config_checks(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())
    prepared = prepare_config(copy.deepcopy(config))  # defaults filled in, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_rays_schema_catches_a_misspelled_launcher_field():
    config = yaml.safe_load((CLUSTER / "launcher" / "aws-gpu.yaml").read_text())
    config["setup_command"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(config, _ray_schema())


# --- KubeRay ---------------------------------------------------------------------------------------------


def _raycluster() -> dict:
    (doc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    return doc


def _rayjob() -> dict:
    (doc,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    return doc


def test_raycluster_pod_templates_pass_the_kubernetes_schema():
    import ray

    spec = _raycluster()["spec"]
    assert spec["rayVersion"] == ray.__version__  # the image's ray is pyproject's
    _validate(_pod(spec["headGroupSpec"]["template"], "head"))
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        _validate(_pod(group["template"], group["groupName"]))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group["groupName"])
    assert gpu_groups, "no GPU worker group"
    for params in [spec["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
        assert all(isinstance(v, str) for v in params.values())  # KubeRay wants strings


def test_the_kubernetes_schema_catches_a_misspelled_pod_field():
    template = copy.deepcopy(_raycluster()["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(_pod(template, "head"))


def _readme_command() -> list[str]:
    """The scaling study's `ray job submit` command of cluster/README.md, as words."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines()
             if "ray job submit" in ln and "scaling_imagenet512.py" in ln and "--working-dir" in ln]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#", 1)[0])


def test_rayjob_runs_the_readmes_command_with_runtime_env_yaml():
    words = _readme_command()
    cut = words.index("--")
    flags, entrypoint = words[:cut], words[cut + 1 :]
    assert flags[:3] == ["ray", "job", "submit"]
    working_dir = flags[flags.index("--working-dir") + 1]
    runtime_env = yaml.safe_load((REPO / flags[flags.index("--runtime-env") + 1]).read_text())
    assert flags[flags.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"

    job = _rayjob()["spec"]
    assert shlex.split(job["entrypoint"]) == entrypoint
    assert entrypoint[:2] == ["python", "studies/scaling_imagenet512.py"]
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {**runtime_env, "working_dir": working_dir}
    # the study takes these flags
    sys.path.insert(0, str(REPO / "studies"))
    try:
        import scaling_imagenet512

        args = scaling_imagenet512.parse_args(entrypoint[2:])
    finally:
        sys.path.remove(str(REPO / "studies"))
    assert args.engine == "ray"


def test_rayjob_submits_from_the_images_checkout_on_the_raycluster():
    job, cluster = _rayjob()["spec"], _raycluster()
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    template = job["submitterPodTemplate"]
    _validate(_pod(template, "submitter"))
    (container,) = template["spec"]["containers"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(container['workingDir'])}$", dockerfile, re.M)
    assert re.search(r"^COPY \. \.$", dockerfile, re.M)  # the whole checkout is there
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


# --- the tracking server ------------------------------------------------------------------------------------


def _serve_sh_settings() -> set[str]:
    return set(re.findall(r"\$\{?(MLFLOW[A-Z_]*)", (CLUSTER / "mlflow" / "serve.sh").read_text()))


def test_tracking_server_deployment_and_service_pass_the_kubernetes_schema():
    docs = {d["kind"]: d for d in _docs(CLUSTER / "mlflow" / "k8s.yaml")}
    assert set(docs) == {"Deployment", "Service"}
    for doc in docs.values():
        _validate(doc)
    deployment, service = docs["Deployment"], docs["Service"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "/opt/lossfloor/cluster/mlflow/serve.sh"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "uri"
    assert set(env) <= _serve_sh_settings()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == int(env["MLFLOW_PORT"]["value"])


def test_systemd_unit_sets_what_serve_sh_reads():
    unit = (CLUSTER / "mlflow" / "mlflow.service").read_text()
    names = set(re.findall(r"^Environment=(\w+)=", unit, re.M))
    assert names and names <= _serve_sh_settings()
    assert re.search(r"^ExecStart=.*cluster/mlflow/serve\.sh$", unit, re.M)
    assert "EnvironmentFile=" in unit  # the database password stays out of the unit
