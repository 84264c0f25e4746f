"""The Helm chart in deploy/helm/aggregator, rendered offline (helm-python-sdk: Helm's own Go
code, no helm binary, no cluster) and validated against the Kubernetes 1.32 schemas
(kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import yaml

from aggregator.config import ConfigError, config_from_mapping, parse_duration
from aggregator.reload import RESTART_KEYS
from tests.project import test_dashboard
from tests.project.test_dashboard import TARGET_LABELS, parse

# A real server's /metrics after real calls (the fixture the dashboard's queries are checked on).
exposition = test_dashboard.exposition

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="validates manifests")

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "aggregator"
KUBERNETES = "1.32.0"
TLS = {"enabled": True, "secretName": "aggregator-tls", "clientCA": {"enabled": True}}


@dataclass
class Release:
    """A rendered release: every manifest, and the raw text of each template."""

    manifests: list[dict[str, Any]]
    texts: dict[str, str]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        (manifest,) = self.all(kind)
        return manifest

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["spec"]["containers"]
        return container

    @property
    def init_container(self) -> dict[str, Any]:
        (container,) = self.pod["spec"]["initContainers"]
        return container

    @property
    def test_pod(self) -> dict[str, Any]:
        (pod,) = [p for p in self.all("Pod") if "helm.sh/hook" in p["metadata"]["annotations"]]
        return pod

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.one("ConfigMap")["data"]["config.yaml"])

    def container_port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)


def render(values: dict[str, Any] | None = None) -> Release:
    with helm.Chart.load(str(CHART)) as chart:
        texts = chart.render(values or {}, name="shop", namespace="checkout")
    manifests = [
        manifest
        for name, text in sorted(texts.items())
        if name.endswith(".yaml")
        for manifest in yaml.safe_load_all(text)
        if manifest
    ]
    return Release(manifests, texts)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


VARIANTS = {
    "defaults": {},
    "tls": {"tls": TLS},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "no-autoscaling": {"autoscaling": {"enabled": False}, "replicaCount": 3},
    "headless": {"headless": {"enabled": True}},
    "no-metrics": {"metricsPort": 0, "serviceMonitor": {"enabled": True}},
    "min-available": {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": None}},
    "two-workers": {"config": {"server": {"workers": 2}}, "resources": {"limits": {"cpu": "2"}}},
    "alerts": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "grpcFrom": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
        }
    },
    "tls-network-policy": {"tls": TLS, "networkPolicy": {"enabled": True}},
    "no-checks": {"checkConfig": {"enabled": False}, "helmTest": {"enabled": False}},
}


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_manifest_validates_against_the_kubernetes_schemas(values):
    release = render(values)

    kinds = set()
    for manifest in release.manifests:
        kinds.add(manifest["kind"])
        if manifest["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: no schema here, checked field by field below
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
    assert {"ConfigMap", "Deployment", "Service", "ServiceAccount"} <= kinds
    assert ("NetworkPolicy" in kinds) == ("networkPolicy" in values)
    assert ("PrometheusRule" in kinds) == ("prometheusRule" in values)


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_config_map_holds_a_config_the_service_accepts(values, tmp_path):
    release = render(values)
    raw = release.config
    tls = raw["server"].get("tls", {})
    for key, path in tls.items():  # files the config names must come from mounted volumes
        tls[key] = str(provide_mounted_file(release, path, tmp_path))

    try:
        config = config_from_mapping(raw)
    except ConfigError as exc:
        pytest.fail("\n".join(exc.problems))
    env = {e["name"]: e["value"] for e in release.container["env"]}
    mount = next(m for m in release.container["volumeMounts"] if m["name"] == "config")
    assert env["AGGREGATOR_CONFIG"] == f"{mount['mountPath']}/config.yaml"
    assert config.server.workers == values.get("config", {}).get("server", {}).get("workers", 1)


_CA = trustme.CA()


def provide_mounted_file(release: Release, path: str, tmp_path: Path) -> Path:
    """Checks that ``path`` is a file of a Secret volume mounted in the container; writes a
    real certificate or key in its place under tmp_path, so the config can be checked here."""
    directory, name = posixpath.split(path)
    mount = next(m for m in release.container["volumeMounts"] if m["mountPath"] == directory)
    volume = next(v for v in release.pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert name in [item["path"] for item in volume["secret"]["items"]]
    leaf = _CA.issue_cert("shop-aggregator.checkout.svc")
    local = tmp_path / mount["name"] / name
    local.parent.mkdir(exist_ok=True)
    blobs = {
        "tls.crt": leaf.cert_chain_pems[0].bytes(),
        "tls.key": leaf.private_key_pem.bytes(),
        "ca.crt": _CA.cert_pem.bytes(),
    }
    local.write_bytes(blobs[name])
    if name == "tls.key":  # the pair must match: write the same leaf's certificate beside it
        (tmp_path / mount["name"] / "tls.crt").write_bytes(blobs["tls.crt"])
    return local


def test_probes_ask_the_health_service_on_the_grpc_port():
    release = render()
    container, config = release.container, release.config

    grpc_port = release.container_port("grpc")
    assert port_of(config["server"]["address"]) == grpc_port
    assert "health_address" not in config["server"]
    probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
    for probe in probes.values():
        assert probe["grpc"]["port"] == grpc_port  # native gRPC probe: a number, plaintext
    assert probes["startup"]["grpc"]["service"] == ""
    assert probes["liveness"]["grpc"]["service"] == ""
    assert probes["readiness"]["grpc"]["service"] == "aggregator.v1.Aggregator"
    startup = probes["startup"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


def test_with_tls_the_probes_use_the_plaintext_health_port_and_the_secret_is_mounted():
    release = render({"tls": TLS})
    container, server = release.container, release.config["server"]

    health_port = release.container_port("grpc-health")
    assert health_port != release.container_port("grpc")
    assert port_of(server["health_address"]) == health_port
    for kind in ("startup", "liveness", "readiness"):
        assert container[f"{kind}Probe"]["grpc"]["port"] == health_port
    volumes = {v["name"]: v for v in release.pod["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "aggregator-tls"
    assert volumes["client-ca"]["secret"]["secretName"] == "aggregator-tls"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert all(m["readOnly"] for name, m in mounts.items() if name != "tmp")
    assert not any("subPath" in m for m in mounts.values())  # Secret updates reach the pod
    assert server["tls"] == {
        "cert": f"{mounts['tls']['mountPath']}/tls.crt",
        "key": f"{mounts['tls']['mountPath']}/tls.key",
        "client_ca": f"{mounts['client-ca']['mountPath']}/ca.crt",
    }


def test_service_ports_are_named_and_point_at_the_container():
    release = render()
    (service,) = release.all("Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}

    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["targetPort"] == "metrics"
    metrics_address = release.config["server"]["metrics_address"]
    assert port_of(metrics_address) == release.container_port("metrics")
    assert service["spec"]["selector"].items() <= release.pod["metadata"]["labels"].items()


def test_metrics_port_zero_turns_the_endpoint_off():
    release = render({"metricsPort": 0, "serviceMonitor": {"enabled": True}})

    assert release.config["server"]["metrics_address"] == ""
    assert [p["name"] for p in release.container["ports"]] == ["grpc"]
    assert [p["name"] for p in release.one("Service")["spec"]["ports"]] == ["grpc"]
    assert release.all("ServiceMonitor") == []


def test_the_admin_page_stays_on_the_pods_loopback_and_off_the_service():
    release = render({"service": {"type": "LoadBalancer"}})
    assert release.config["server"]["admin_address"] == "127.0.0.1:9465"
    for service in release.all("Service"):
        assert 9465 not in {p["port"] for p in service["spec"]["ports"]}
        assert "admin" not in {p["name"] for p in service["spec"]["ports"]}
    assert 9465 not in {p["containerPort"] for p in release.container["ports"]}
    # Whatever config.server says, the chart keeps it on loopback.
    exposed = render({"config": {"server": {"admin_address": "0.0.0.0:9465"}}})
    assert exposed.config["server"]["admin_address"] == "127.0.0.1:9465"
    assert render({"adminPort": 0}).config["server"]["admin_address"] == ""


def test_headless_service_for_client_side_balancing():
    release = render({"headless": {"enabled": True}})
    services = {s["metadata"]["name"]: s for s in release.all("Service")}

    headless = services["shop-aggregator-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]  # scraped once, not twice
    assert headless["spec"]["selector"] == services["shop-aggregator"]["spec"]["selector"]
    assert len(render().all("Service")) == 1  # off by default


def test_pods_run_as_non_root_with_a_read_only_root_and_no_capabilities():
    release = render()
    pod, container = release.pod["spec"], release.container["securityContext"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert release.one("ServiceAccount")["automountServiceAccountToken"] is False
    tmp = next(m for m in release.container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert next(v for v in pod["volumes"] if v["name"] == tmp["name"])["emptyDir"]
    assert {"requests", "limits"} <= release.container["resources"].keys()


def test_with_config_changes_restart_any_config_change_rolls_the_pods():
    def checksum(values: dict[str, Any]) -> str:
        release = render({"configChanges": "restart", **values})
        return str(release.pod["metadata"]["annotations"]["checksum/config"])

    default = render({"configChanges": "restart"})
    configmap = default.texts["aggregator/templates/configmap.yaml"]
    assert checksum({}) == hashlib.sha256(configmap.encode()).hexdigest()
    changed = {"config": {"upstreams": {"catalog": {"kind": "http", "url": "http://c"}}}}
    assert checksum(changed) != checksum({})
    assert checksum({"replicaCount": 5}) == checksum({})


def read_at_start(values: dict[str, Any]) -> str:
    annotations = render(values).pod["metadata"]["annotations"]
    assert "checksum/config" not in annotations
    return str(annotations["checksum/config-read-at-start"])


def test_by_default_the_pods_reload_a_config_change_and_roll_only_for_keys_read_at_start():
    default = read_at_start({})
    upstream = {"config": {"upstreams": {"catalog": {"kind": "http", "url": "http://c"}}}}
    assert read_at_start(upstream) == default
    assert read_at_start({"config": {"server": {"max_targets": 7}}}) == default
    # Every key the server applies only at start rolls the pods (the list is the server's).
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        if section == "tracing":
            changed = {"config": {"tracing": {"exporter": "console"}}}
        elif section == "limits":
            changed = {"config": {"limits": {"backend": "redis"}}}
        elif name == "tls":
            changed = {"tls": TLS}
        elif name.endswith("_address") or name == "address":
            port = {"address": "port", "health_address": "healthPort"}.get(name)
            port = port or name.removesuffix("_address") + "Port"
            changed = {port: 40000, "tls": TLS} if name == "health_address" else {port: 40000}
        else:
            changed = {"config": {"server": {name: "changed"}}}
        assert read_at_start(changed) != default, key
    # Callers' quotas keep their counters for the process's life: a change rolls the pods too.
    caller = {"token_subject": "svc", "aggregates": ["*"]}
    callers = {"config": {"auth": {"callers": {"web": caller}}}}
    quota = {"config": {"auth": {"callers": {"web": {**caller, "max_concurrent_calls": 5}}}}}
    assert read_at_start(callers) == default  # a caller without quotas: reloaded
    assert read_at_start(quota) != default


@pytest.mark.parametrize(("grace", "pre_stop", "expected"), [("10s", 5, 20), ("25s", 0, 30)])
def test_termination_grace_covers_the_prestop_sleep_and_the_shutdown_grace(
    grace, pre_stop, expected
):
    release = render(
        {"config": {"server": {"shutdown_grace": grace}}, "preStopSleepSeconds": pre_stop}
    )
    spec = release.pod["spec"]

    assert spec["terminationGracePeriodSeconds"] == expected
    assert expected >= pre_stop + parse_duration(grace) + 5
    lifecycle = release.container.get("lifecycle", {})
    if pre_stop:
        assert lifecycle["preStop"] == {"sleep": {"seconds": pre_stop}}
    else:
        assert "preStop" not in lifecycle


def test_autoscaling_owns_the_replica_count_when_on():
    scaled = render()
    fixed = render({"autoscaling": {"enabled": False}, "replicaCount": 3})

    hpa = scaled.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == scaled.one("Deployment")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in scaled.one("Deployment")["spec"]
    assert fixed.all("HorizontalPodAutoscaler") == []
    assert fixed.one("Deployment")["spec"]["replicas"] == 3


def test_disruption_budget_and_topology_spread_select_this_releases_pods():
    release = render()
    labels = release.pod["metadata"]["labels"]

    pdb = release.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    constraints = release.pod["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    strategy = release.one("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_service_monitor_is_off_by_default_and_scrapes_the_metrics_port():
    assert render().all("ServiceMonitor") == []
    release = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})

    monitor = release.one("ServiceMonitor")
    service = release.one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["checkout"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"enabled": True}}, "tls.secretName: required when tls.enabled"),
        (
            {"config": {"server": {"tls": {"cert": "/c", "key": "/k"}}}},
            "config.server.tls: set tls.enabled and tls.secretName instead",
        ),
        ({"tls": TLS, "healthPort": 50051}, "healthPort: must differ from port"),
        (
            {"terminationGracePeriodSeconds": 12},
            "terminationGracePeriodSeconds (12) must be larger than",
        ),
        ({"config": {"server": {"shutdown_grace": "ten"}}}, '"ten" is not a duration'),
        # values.schema.json: a misspelt or mistyped value fails instead of being ignored.
        ({"tls": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"port": "grpc"}, "at '/port': got string, want integer"),
    ],
)
def test_values_that_cannot_work_are_refused_at_render_time(values, message):
    with pytest.raises(helm.HelmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render(values)


def test_the_chart_lints_clean():
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBERNETES}")

    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [{}, {"tls": TLS}], ids=["plaintext", "tls"])
def test_an_init_container_checks_the_config_the_server_will_read(values):
    release = render(values)
    init, server = release.init_container, release.container

    env = {e["name"]: e["value"] for e in server["env"]}
    assert init["command"] == ["aggregator", "check-config", env["AGGREGATOR_CONFIG"]]
    assert init["image"] == server["image"]
    assert init["volumeMounts"] == server["volumeMounts"]  # the TLS files it checks, too
    assert init["securityContext"] == server["securityContext"]
    assert {"requests", "limits"} <= init["resources"].keys()
    assert release.one("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "initContainers" not in render({"checkConfig": {"enabled": False}}).pod["spec"]


def run_init_container(release: Release, tmp_path: Path) -> tuple[int, str]:
    """Runs the rendered init container's command here: the ConfigMap written where the pod
    mounts it (under tmp_path), the real `aggregator check-config`."""
    mount = next(m for m in release.init_container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in release.pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == release.one("ConfigMap")["metadata"]["name"]
    local = tmp_path / mount["mountPath"].lstrip("/")
    local.mkdir(parents=True)
    for key, text in release.one("ConfigMap")["data"].items():
        (local / key).write_text(text)
    program, *args = release.init_container["command"]
    args = [str(tmp_path / a.lstrip("/")) if a.startswith(mount["mountPath"]) else a for a in args]
    executable = Path(sys.executable).with_name(program)  # the virtualenv's console script
    done = subprocess.run([executable, *args], capture_output=True, text=True, check=False)
    return done.returncode, done.stdout + done.stderr


def test_helm_template_with_a_bad_config_value_renders_an_init_container_that_refuses_it(tmp_path):
    good = render()
    bad = render({"config": {"upstreams": {"catalog": {"kind": "http", "url": "http://c:80",
                                                        "timout": "1s"}}}})  # fmt: skip

    # Helm cannot know the service's keys: the typo renders, and reaches the ConfigMap...
    assert bad.config["upstreams"]["catalog"]["timout"] == "1s"
    # ...and the pod's first container is the check that stops it before the server starts.
    code, output = run_init_container(bad, tmp_path / "bad")
    assert code != 0
    assert "timout" in output
    assert run_init_container(good, tmp_path / "good")[0] == 0


def test_helm_test_hook_asks_the_services_health_check():
    release = render()
    pod = release.test_pod
    service = release.one("Service")

    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == release.container["image"]
    target, name = container["command"][3:]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert target == f"{service['metadata']['name']}.checkout.svc:{port}"
    assert name == "aggregator.v1.Aggregator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Never one of the release's serving pods: no Service, PDB or spread constraint counts it.
    labels = pod["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= labels.items()
    assert not release.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    assert render({"helmTest": {"enabled": False}}).all("Pod") == []


def test_helm_test_hook_with_tls_verifies_the_server_and_presents_a_client_certificate():
    release = render({"tls": TLS, "helmTest": {"tlsServerName": "aggregator.example"}})
    (container,) = release.test_pod["spec"]["containers"]

    ca, server_name, cert, key = container["command"][5:]
    (mount,) = container["volumeMounts"]
    assert {ca, cert, key} == {
        f"{mount['mountPath']}/{n}" for n in ("ca.crt", "tls.crt", "tls.key")
    }
    assert server_name == "aggregator.example"
    (volume,) = release.test_pod["spec"]["volumes"]
    assert volume["secret"]["secretName"] == TLS["secretName"]


async def run_test_hook(release: Release, target: str, service: str) -> tuple[int, str]:
    (container,) = release.test_pod["spec"]["containers"]
    program, flag, script, *_ = container["command"]
    assert (program, flag) == ("python", "-c")
    process = await asyncio.create_subprocess_exec(
        sys.executable, flag, script, target, service,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    return await process.wait(), output.decode()


async def test_helm_test_hooks_script_passes_on_serving_and_fails_otherwise(start_server):
    release = render()
    server, _ = await start_server()
    target = f"127.0.0.1:{server.port}"

    code, output = await run_test_hook(release, target, "aggregator.v1.Aggregator")
    assert (code, output.strip()) == (0, f"{target} aggregator.v1.Aggregator: SERVING")
    code, output = await run_test_hook(release, target, "no.such.Service")
    assert code != 0
    assert grpc.StatusCode.NOT_FOUND.name in output


PROMETHEUS_RULE = {"prometheusRule": {"enabled": True}}


def alert_exprs() -> list[str]:
    rule = render(PROMETHEUS_RULE).one("PrometheusRule")
    return [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]


def test_prometheus_rule_is_off_by_default_and_alerts_on_the_four_signals():
    assert render().all("PrometheusRule") == []
    values = {"prometheusRule": {"enabled": True, "labels": {"release": "prom"},
                                 "errorRatio": 0.1, "for": "10m", "severity": "page"}}  # fmt: skip
    rule = render(values).one("PrometheusRule")

    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {"AggregatorErrorRatioHigh", "AggregatorCircuitOpen",
                           "AggregatorOverheadHigh", "AggregatorRejectingCalls"}  # fmt: skip
    for alert in alerts.values():
        assert set(alert) == {"alert", "expr", "for", "labels", "annotations"}
        assert alert["labels"] == {"severity": "page"}
        assert {"summary", "description"} <= alert["annotations"].keys()
    assert alerts["AggregatorErrorRatioHigh"]["expr"].strip().endswith("> 0.1")
    assert alerts["AggregatorErrorRatioHigh"]["for"] == "10m"
    assert "10%" in alerts["AggregatorErrorRatioHigh"]["annotations"]["summary"]
    assert alerts["AggregatorCircuitOpen"]["for"] == "2m"
    for expr in alert_exprs():  # this release's series only, as its ServiceMonitor scrapes them
        for _, matchers in parse(expr)[0]:
            assert ("namespace", "=", "checkout") in matchers
            assert ("job", "=", "shop-aggregator") in matchers


@pytest.mark.parametrize("expr", alert_exprs())
async def test_alerts_use_only_series_and_labels_the_server_exposes(expr, exposition):
    selectors, groupings, bare = parse(expr)

    assert re.sub(r"[\d.]+", "", " ".join(bare)).strip() == "", f"unparsed {bare} in {expr}"
    for name, matchers in selectors:
        assert name in exposition, f"{name} is not on /metrics"
        labels = exposition.labels[name]
        for label, _, value in matchers:
            assert label in set(labels) | TARGET_LABELS, f"{name} has no label {label}"
            if label == "code":  # gRPC status names, whether this run saw them or not
                assert set(value.split("|")) <= {c.name for c in grpc.StatusCode}
            elif label not in TARGET_LABELS:
                assert value in labels[label], f'{name}{{{label}="{value}"}} never seen'
        kind = exposition.kinds[name]
        assert (f"rate({name}{{" in expr) == (kind in ("counter", "histogram")), expr
    assert set(groupings) <= {"le", "upstream"}


def test_network_policy_is_off_by_default_and_opens_only_the_services_ports():
    assert render().all("NetworkPolicy") == []
    release = render(VARIANTS["network-policy"])
    policy = release.one("NetworkPolicy")["spec"]

    assert policy["podSelector"]["matchLabels"].items() <= release.pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ports = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert set(ports) == {p["name"] for p in release.container["ports"]} == {"grpc", "metrics"}
    grpc_from = ports["grpc"]["from"]
    assert grpc_from[0] == {"podSelector": {"matchLabels": {"role": "frontend"}}}
    # the helm test pod may call it too
    test_labels = release.test_pod["metadata"]["labels"]
    assert grpc_from[1]["podSelector"]["matchLabels"].items() <= test_labels.items()
    assert ports["metrics"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    ]
    upstreams, dns = policy["egress"]
    assert upstreams == {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    assert {p["port"] for p in dns["ports"]} == {53}


def test_network_policy_leaves_egress_open_unless_it_is_a_list():
    open_egress = render({"networkPolicy": {"enabled": True}}).one("NetworkPolicy")["spec"]
    assert open_egress["policyTypes"] == ["Ingress"]
    assert "egress" not in open_egress
    assert all("from" not in rule for rule in open_egress["ingress"])  # no peers: anyone

    dns_only = render({"networkPolicy": {"enabled": True, "egress": []}}).one("NetworkPolicy")
    assert dns_only["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ((rule,),) = [dns_only["spec"]["egress"]]
    assert {p["port"] for p in rule["ports"]} == {53}
