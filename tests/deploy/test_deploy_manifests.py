"""Offline checks of the Kubernetes manifests (deploy/kubernetes) against the code they run.

No cluster and no network: every YAML document is parsed, and each container's command line,
environment, ports, probes and drain timeouts are checked against the real argparse parser,
the services' option builders, their HTTP route tables and the environment names the source
reads. Secrets must hold placeholders only.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
TEMPLATE = "secrets.template.yaml"  # not a kustomize resource: never applied over real secrets

# Names a container may set that helixflow itself does not read, each with its reason.
NOT_READ_BY_HELIXFLOW = {
    "POD_NAME": "only expanded into HELIXFLOW_ADVERTISE",
    "HOME": "where torch and Triton keep their kernel caches",
}
# helixflow/auth/service.py serve(): gRPC stops with a 1 s grace, HTTP is awaited up to 5 s.
AUTH_DRAIN_S = 6.0
# Variables holding an address of another service: (component, container port name).
ADDRESSES = {"AUTH_SERVICE_GRPC": ("auth", "grpc"), "AUTH_SERVICE_URL": ("auth", "http"),
             "INFERENCE_POOL_URL": ("pool", "grpc"), "HELIXFLOW_ADVERTISE": ("pool", "grpc"),
             "GATEWAY_URL": ("gateway", "https")}  # fmt: skip
SECRET_ONLY = {"DATABASE_URL", "HELIXFLOW_MASTER_KEY"}
PRIVATE_KEY = re.compile(r"BEGIN [A-Z ]*PRIVATE KEY")
BASE64_BLOB = re.compile(r"[A-Za-z0-9+/_=-]{65,}")

Doc = dict[str, Any]


@functools.cache
def _documents() -> tuple[tuple[str, Doc], ...]:
    return tuple((path.name, doc) for path in sorted(KUBE.glob("*.yaml"))
                 for doc in yaml.safe_load_all(path.read_text()) if doc is not None)  # fmt: skip


def _objects(kind: str | None = None) -> list[Doc]:
    return [d for _, d in _documents()
            if d.get("kind") != "Kustomization" and kind in (None, d.get("kind"))]  # fmt: skip


def _named(kind: str, name: str) -> Doc:
    found = [d for d in _objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads() -> list[Doc]:
    return [d for d in _objects() if d["kind"] in ("Deployment", "StatefulSet")]


def _containers() -> list[tuple[Doc, Doc]]:
    return [(w, c) for w in _workloads() for c in w["spec"]["template"]["spec"]["containers"]]


def _component(workload: Doc) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def _workload(component: str) -> tuple[Doc, Doc]:
    (found,) = [(w, c) for w, c in _containers() if _component(w) == component]
    return found


def _parse(container: Doc) -> argparse.Namespace:
    from helixflow.cli import _build_parser

    assert container["command"] == ["helixflow"]
    try:
        return _build_parser().parse_args([str(a) for a in container["args"]])
    except SystemExit:
        pytest.fail(f"{container['name']}: helixflow rejects {container['args']}")


def _env(workload: Doc, container: Doc) -> dict[str, tuple[str, str]]:
    """name -> (value, source) as the kubelet sets it; Secrets give their placeholders."""

    def data(kind: str, name: str) -> dict[str, str]:
        doc = _named(kind, name)
        return {k: str(v) for k, v in {**doc.get("data", {}), **doc.get("stringData", {})}.items()}

    env: dict[str, tuple[str, str]] = {}
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", "configMapRef") if "configMapRef" in source else ("Secret", "secretRef")
        )
        env.update((k, (v, kind)) for k, v in data(kind, source[ref]["name"]).items())
    for var in container.get("env", []):
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)][0], str(var["value"]))
            env[var["name"]] = (value, "literal")
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = (f"{workload['metadata']['name']}-0", "field")
            continue
        kind, key = (
            ("ConfigMap", "configMapKeyRef")
            if "configMapKeyRef" in ref
            else ("Secret", "secretKeyRef")
        )
        env[var["name"]] = (data(kind, ref[key]["name"])[ref[key]["key"]], kind)
    return env


@functools.cache
def _env_names_read() -> frozenset[str]:
    """Every environment name helixflow/ reads: env.get("X"), environ["X"], a call given `env`
    and "X" (e.g. _port(env, "HTTP_PORT", ...)), and HELIXFLOW_<KEY> of helixflow serve."""

    def is_env(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in ("env", "environ")) or (
            isinstance(node, ast.Attribute) and node.attr == "environ"
        )

    def names(nodes: list[ast.expr]) -> set[str]:
        return {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and re.fullmatch(r"[A-Z][A-Z0-9_]+", n.value)}  # fmt: skip

    found: set[str] = set()
    for path in (ROOT / "helixflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and is_env(node.value):
                found |= names([node.slice])
            elif isinstance(node, ast.Call):
                func = node.func
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr in ("get", "getenv")
                    and (is_env(func.value) or func.attr == "getenv")
                ):
                    found |= names(node.args[:1])
                if any(is_env(a) for a in node.args):
                    found |= names(node.args)
    import msgspec

    from helixflow.serve_config import ServeConfig

    return frozenset(found | {f"HELIXFLOW_{f.name.upper()}"
                              for f in msgspec.structs.fields(ServeConfig)})  # fmt: skip


def _gateway_config(tmp_path: Path) -> Any:
    from helixflow.gateway.config import GatewayConfig, load_config

    workload, container = _workload("gateway")
    args = _parse(container)
    toml = tmp_path / "helixflow.toml"
    toml.write_text(_named("ConfigMap", "helixflow-config")["data"]["helixflow.toml"])
    import msgspec

    flags = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(GatewayConfig)
             if hasattr(args, f.name)}  # fmt: skip
    env = {k: v for k, (v, _) in _env(workload, container).items()}
    return load_config(flags, env, config_path=str(toml))


def _listening(component: str, tmp_path: Path) -> tuple[str, dict[str, int]]:
    """(host, {port name: port}) the service will bind, from its real option builder; the
    HTTP port is named https when the service serves TLS."""
    workload, container = _workload(component)
    args = _parse(container)
    env = {k: v for k, (v, _) in _env(workload, container).items()}
    if component == "gateway":
        config = _gateway_config(tmp_path)
        return config.host, {"https" if config.tls_cert else "http": config.port}
    if component == "pool":  # NOTE: pool.service imports torch (seconds): read the flags
        return args.host, {"grpc": args.port, "metrics": args.metrics_port}
    if component == "auth":
        from helixflow.auth.service import options_from_env
        from helixflow.auth.signing_keys import generate_master_key

        assert "HELIXFLOW_MASTER_KEY" in env
        env["HELIXFLOW_MASTER_KEY"] = generate_master_key()  # the template holds a placeholder
    else:
        from helixflow.monitoring.service import options_from_env  # type: ignore[assignment]
    opts = options_from_env(args, env)
    return opts.host, {"grpc": opts.grpc_port, "https" if opts.tls_cert else "http": opts.http_port}


@functools.cache
def _serves(component: str, path: str) -> bool:
    """Whether the component's real HTTP app has a GET route for `path`."""
    if component == "gateway":
        from helixflow.gateway.app import Gateway
        from helixflow.gateway.config import GatewayConfig

        return ("GET", path) in Gateway(GatewayConfig(pool_urls=[]), {}).routes
    if component == "auth":
        from helixflow.auth.http_api import AuthHttpApp

        return AuthHttpApp(object())._route("GET", path)[0] is not None  # type: ignore[arg-type]
    from types import SimpleNamespace

    from helixflow.monitoring.http_app import MonitorHttpApp

    app = MonitorHttpApp(SimpleNamespace(interval_s=1.0, polls=0))  # type: ignore[arg-type]
    return path in app.routes


def _prestop_s(container: Doc) -> float:
    assert "preStop" in container.get("lifecycle", {}), f"{container['name']}: no preStop hook"
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_every_document_is_a_named_object_and_kustomize_lists_them() -> None:
    seen = set()
    for file, doc in _documents():
        if doc.get("kind") == "Kustomization":
            continue
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), file
        assert (doc["kind"], doc["metadata"]["name"]) not in seen, f"{file}: duplicate"
        seen.add((doc["kind"], doc["metadata"]["name"]))
    (kustomization,) = [d for _, d in _documents() if d.get("kind") == "Kustomization"]
    listed = set(kustomization["resources"])
    assert all((KUBE / name).is_file() for name in listed), listed
    assert TEMPLATE not in listed
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml", TEMPLATE}


def test_containers_declare_image_resources_ports_and_probes(tmp_path: Path) -> None:
    for workload, container in _containers():
        component, name = _component(workload), container["name"]
        assert container.get("image"), name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        host, listening = _listening(component, tmp_path)
        assert (host, ports) == ("0.0.0.0", listening), f"{name}: declared != bound"
        assert container.get("livenessProbe") and container.get("readinessProbe"), name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            spec = container.get(probe)
            if spec is None:
                continue
            if "grpc" in spec:  # k8s gRPC probes take a number, never a port name
                assert spec["grpc"]["port"] == ports["grpc"], f"{name} {probe}"
                continue
            http = spec["httpGet"]
            port = ports.get(http["port"], http["port"])
            web = "https" if "https" in ports else "http"
            assert port == ports[web], f"{name} {probe}: not the HTTP port"
            assert http.get("scheme", "HTTP") == web.upper(), f"{name} {probe}: scheme"
            assert _serves(component, http["path"]), f"{name} {probe}: no route {http['path']}"


def test_flags_parse_and_env_names_are_read_by_the_code() -> None:
    read = _env_names_read() | set(NOT_READ_BY_HELIXFLOW)
    for workload, container in _containers():
        args = _parse(container)
        assert args.command == _component(workload), container["name"]
        env = _env(workload, container)
        assert set(env) <= read, f"{container['name']}: not read by helixflow: {set(env) - read}"
        for secret in SECRET_ONLY & set(env):
            assert env[secret][1] == "Secret", f"{secret} must come from a Secret"


def _target_port(address: str) -> tuple[Doc, str, str]:
    """(Service, its targetPort, URL scheme) that a ``host:port`` or URL of the manifests names:
    a Service, or ``<statefulset>-<ordinal>.<headless Service>`` for one pool."""
    parts = urlsplit(address if "://" in address else f"grpc://{address}")
    host = str(parts.hostname)
    pod, _, service_name = host.rpartition(".")
    service = _named("Service", service_name)
    if pod:
        (sts,) = [w for w in _workloads() if w["spec"].get("serviceName") == service_name]
        prefix, _, ordinal = pod.rpartition("-")
        assert prefix == sts["metadata"]["name"], address
        assert int(ordinal) < sts["spec"]["replicas"], f"{address}: no such replica"
    (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == parts.port]
    return service, target, parts.scheme


def test_addresses_name_services_and_ports_of_these_manifests() -> None:
    redis = set()
    for workload, container in _containers():
        env = {k: v for k, (v, _) in _env(workload, container).items()}
        redis |= {env[k] for k in ("REDIS_URL", "HELIXFLOW_REGISTER") if k in env}
        for var in ADDRESSES.keys() & env.keys():
            component, port_name = ADDRESSES[var]
            owner, owner_container = _workload(component)
            for address in env[var].split(","):
                service, target, scheme = _target_port(address)
                assert service["spec"]["selector"].items() <= _labels(owner).items(), var
                assert target == port_name, f"{var}={address}: not the {port_name} port"
                assert port_name in {p["name"] for p in owner_container["ports"]}
                assert scheme == "https" or port_name != "https", f"{var}={address}"
    assert len(redis) == 1, f"one Redis for rate limits, revocations and the registry: {redis}"


def _labels(workload: Doc) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def test_references_resolve() -> None:
    for doc in _objects():
        selector = doc.get("spec", {}).get("selector")
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            labels = selector if doc["kind"] == "Service" else selector["matchLabels"]
            matched = [w for w in _workloads() if labels.items() <= _labels(w).items()]
            assert len(matched) == 1, f"{doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] == "Service":
                names = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"]
                         for p in c["ports"]}  # fmt: skip
                assert {p["targetPort"] for p in doc["spec"]["ports"]} <= names
        if doc["kind"] == "NetworkPolicy":
            assert any(doc["spec"]["podSelector"]["matchLabels"].items() <= _labels(w).items()
                       for w in _workloads())  # fmt: skip
        if doc["kind"] == "StatefulSet":
            assert _named("Service", doc["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    for workload, container in _containers():
        env = _env(workload, container)  # resolves every ConfigMap/Secret (key) reference
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        files: dict[str, set[str]] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            assert volume or mount["name"] in claims, mount["name"]
            for kind, field, key in (("ConfigMap", "configMap", "name"),
                                     ("Secret", "secret", "secretName")):  # fmt: skip
                if field in volume:
                    doc = _named(kind, volume[field][key])
                    keys = set(doc.get("data", {})) | set(doc.get("stringData", {}))
                    items = volume[field].get("items", [{"key": k, "path": k} for k in keys])
                    assert {i["key"] for i in items} <= keys, mount["name"]
                    files[mount["mountPath"]] = {i["path"] for i in items}
            files.setdefault(mount["mountPath"], set())
        for name, (value, _) in env.items():  # every path the environment names is mounted
            if value.startswith("/"):
                directory, _, file = value.rpartition("/")
                assert value in files or file in files.get(directory, ()), f"{name}={value}"


def test_drains_fit_the_grace_periods(tmp_path: Path) -> None:
    gateway = _gateway_config(tmp_path)
    request_timeout = gateway.request_timeout
    drains = {"gateway": gateway.shutdown_timeout, "auth": AUTH_DRAIN_S}
    _, pool = _workload("pool")
    drains["pool"] = _parse(pool).shutdown_timeout
    assert drains["pool"] >= request_timeout, "a pool drain would cut requests still awaited"
    for component, drain in drains.items():
        workload, container = _workload(component)
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= _prestop_s(container) + drain, f"{component}: grace {grace} s too short"


def test_replicas_autoscaling_and_the_gpu() -> None:
    for component in ("gateway", "auth", "pool"):
        assert _workload(component)[0]["spec"]["replicas"] >= 2, component
    (hpa,) = _objects("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] >= 2
    gateway, _ = _workload("gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": gateway["metadata"]["name"]}  # fmt: skip
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    workload, pool = _workload("pool")
    assert pool["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pool["resources"]["limits"]["nvidia.com/gpu"] == 1
    home = _env(workload, pool)["HELIXFLOW_HOME"][0]
    claims = {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
    assert any(m["mountPath"] == home and m["name"] in claims for m in pool["volumeMounts"])


def test_secrets_hold_placeholders_only() -> None:
    secrets = [(file, d) for file, d in _documents() if d.get("kind") == "Secret"]
    assert secrets and all(file == TEMPLATE for file, _ in secrets)
    for _, secret in secrets:
        assert not secret.get("data"), "placeholders go in stringData, readable"
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"{secret['metadata']['name']}.{key}: not a placeholder"
    for path in KUBE.parent.rglob("*"):  # deploy/, comments included
        if path.is_file():
            text = path.read_text()
            assert not PRIVATE_KEY.search(text), f"{path}: a private key"
            assert not BASE64_BLOB.search(text), f"{path}: {BASE64_BLOB.search(text)}"
