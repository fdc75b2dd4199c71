"""deploy/k8s: every manifest validates against Kubernetes' schemas (kubernetes-validate, its
bundled schemas: no network), and what the manifests say of asr-server exists in asr-server:
its flags (`asr-server --help`), its ports, its health service names and metric names, and a
termination grace that covers the drain."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (the dev extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
IMAGE_FLAGS = {"--port": "50051", "--metrics-port": "9400", "--metrics-host": "0.0.0.0"}  # the Dockerfile's entry


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def server_container() -> dict:
    return find("Deployment", "asr-server")["spec"]["template"]["spec"]["containers"][0]


def server_args() -> dict[str, str]:
    """The flags the pod runs asr-server with: the image's entry command's, then the manifest's."""
    args = dict(IMAGE_FLAGS)
    for arg in server_container()["args"]:
        flag, _, value = arg.partition("=")
        args[flag] = value
    return args


def test_manifests_validate_against_the_kubernetes_schemas():
    docs = documents()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "HorizontalPodAutoscaler"} <= kinds
    version = kubernetes_validate.latest_version()
    for name, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
    broken = dict(find("Deployment", "asr-server"))
    broken["spec"] = dict(broken["spec"], replicas="two")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_every_flag_the_manifests_name_exists_in_asr_server():
    help_text = subprocess.run([sys.executable, "-m", "server.service.cli", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                            "COLUMNS": "200"}).stdout
    known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", help_text))
    assert "--drain-grace-s" in known and "--max-connection-age-s" in known
    named = set(server_args())
    manifest = "\n".join(line for line in (K8S / "asr-server.yaml").read_text().splitlines()
                         if not line.lstrip().startswith("#"))  # comments name client flags too
    named |= set(re.findall(r"--[a-z0-9][a-z0-9-]*", manifest))
    assert named <= known, f"flags asr-server does not have: {sorted(named - known)}"
    from server.service.cli import parse_args

    args = parse_args([f"{k}={v}" for k, v in server_args().items()])
    assert (args.port, args.metrics_port, args.metrics_host) == (50051, 9400, "0.0.0.0")


def test_ports_probes_and_services_match_the_server():
    from server.service.app import SERVICE_NAME

    args = server_args()
    container = server_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(args["--port"]), "metrics": int(args["--metrics-port"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == ports["grpc"], probe
        assert grpc_probe.get("service", "") in ("", SERVICE_NAME), f"{probe}: a service asr-server reports health for"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    headless = find("Service", "asr-server-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for port in headless["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    pod_labels = find("Deployment", "asr-server")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    assert find("PodDisruptionBudget", "asr-server")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_termination_grace_covers_the_drain():
    args = server_args()
    pod = find("Deployment", "asr-server")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(args["--drain-notice-s"]) + float(args["--drain-grace-s"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 5, (pod["terminationGracePeriodSeconds"], drain)
    assert pod["terminationGracePeriodSeconds"] <= drain + 60, "a grace far past the drain only delays rollouts"


def test_the_proxy_runs_the_shipped_haproxy_config_against_the_servers():
    config = find("ConfigMap", "asr-proxy")["data"]["haproxy.cfg"]
    assert config == (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    proxy = find("Deployment", "asr-proxy")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in proxy["env"]}
    for variable in set(re.findall(r"\$\{(\w+)\}", config)):
        assert variable in env, f"haproxy.cfg uses ${{{variable}}}, the proxy Deployment does not set it"
    assert env["ASR_METRICS_PORT"] == server_args()["--metrics-port"]
    host, port = env["ASR_BACKEND_DNS"].rsplit(":", 1)
    assert host.startswith("asr-server-headless.asr.") and port == server_args()["--port"]


def test_scrape_config_and_autoscaler_use_metrics_the_server_exports():
    from prometheus_client import generate_latest

    from server.ops.metrics import ServerMetrics
    from server.scheduling.scheduler import Scheduler
    from tests.fake_engine import FakeEngine

    metrics = ServerMetrics()
    metrics.bind(Scheduler(FakeEngine(capacity=8)))
    exported = generate_latest(metrics.registry).decode()
    metrics.close()
    assert "asr_slots_capacity 8.0" in exported
    adapter = yaml.safe_load(find("ConfigMap", "asr-prometheus-adapter-rules")["data"]["config.yaml"])
    rule = adapter["rules"][0]
    used = set(re.findall(r"\b(asr_[a-z_]+)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    used.add(rule["name"]["matches"].strip("^$"))
    for name in used:
        assert re.search(rf"^{name} ", exported, re.M), f"the adapter rule uses {name}, which asr-server does not export"
    hpa = find("HorizontalPodAutoscaler", "asr-server")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "asr-server"
    scrape = yaml.safe_load(find("ConfigMap", "asr-prometheus-scrape")["data"]["asr-scrape.yaml"])
    keep_port = [r for r in scrape["scrape_configs"][0]["relabel_configs"]
                 if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]]
    assert keep_port and keep_port[0]["regex"] in {p["name"] for p in server_container()["ports"]}
