"""The Helm chart (helm/meshllm), rendered by Helm's own engine (helm-python-sdk, offline).

For the default values and each value set in helm/meshllm/ci: lint is clean, every manifest
validates against the Kubernetes schemas, checkov finds nothing (skips carry a reason that
docs/kubernetes.md explains), and the router config and replica flags the chart renders are
loaded by the router's and the replica's own code, with the files the pods would see mounted.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from chart import lint as lint_chart
from chart import load_values, manifests_text, render
from chart import main as chart_main
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshllm.replica import cli as replica_cli
from meshllm.router import cli as router_cli
from meshllm.router.config import RouterConfig, read_config_file
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.quota.limits import LIMITS
from meshllm.router.tenants import load_tenants

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "meshllm"
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
NAMESPACE = "meshllm"
VALUE_SETS = {
    "default": (),
    "cpu": ("cpu-values.yaml",),
    "redis": ("redis-values.yaml",),
    "tls": ("tls-values.yaml",),
}
KUBE_VERSIONS = ("1.27.0", "1.37.0")  # the chart's kubeVersion floor and the newest schemas
CRDS = {"ServiceMonitor"}  # Prometheus Operator kinds: no schema in kubernetes-validate
POD_NAME = "meshllm-replica-0"
HASH = "sha256:" + "ab" * 32
TMP = "/tmp"  # noqa: S108  (the pods' emptyDir mount point, not a file of this test)
InPod = Callable[["Rendered", dict[str, Any]], list[str]]


@dataclass
class Rendered:
    """One value set rendered: the values Helm used (defaults merged) and the manifests."""

    name: str
    values: dict[str, Any]
    files: dict[str, str]
    manifests: list[dict[str, Any]] = field(default_factory=list)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.all(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {kind} {name}: {len(found)} found"
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((m for m in self.all(kind) if m["metadata"]["name"] == name), None)

    @property
    def router(self) -> dict[str, Any]:
        return self.one("Deployment", "meshllm-router")

    @property
    def replicas(self) -> dict[str, Any]:
        return self.one("StatefulSet", "meshllm-replica")

    @property
    def router_toml(self) -> str:
        data: str = self.one("ConfigMap", "meshllm-router")["data"]["router.toml"]
        return data

    def secret_data(self, name: str) -> dict[str, str] | None:
        secret = self.find("Secret", name)
        if secret is None:
            return None
        data = dict(secret.get("stringData") or {})
        for key, value in (secret.get("data") or {}).items():
            data[key] = base64.b64decode(value).decode()
        return data


def render_set(name: str, extra: dict[str, Any] | None = None) -> Rendered:
    values = load_values([CHART / "ci" / f for f in VALUE_SETS.get(name, ())])
    values = _merge(values, extra or {})
    files = render(CHART, values, release="meshllm", namespace=NAMESPACE)
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
    docs = yaml.safe_load_all(manifests_text(files))
    return Rendered(name, merged, files, [d for d in docs if d])


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render_set(name) for name in VALUE_SETS}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


# --- files the pods would see ----------------------------------------------------------------


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip


def _cert(
    cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def tls_secret(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str) -> dict[str, str]:
    """A kubernetes.io/tls Secret's data as cert-manager writes it."""
    cert, key = _cert(cn, ca)
    return {"tls.crt": _pem(cert), "tls.key": _pem(key), "ca.crt": _pem(ca[0])}


@pytest.fixture(scope="module")
def user_secrets() -> dict[str, dict[str, str]]:
    """Secrets the value sets name but the chart does not make (the operator's own)."""
    ca = _cert("meshllm test CA", None)
    return {
        "meshllm-router-tls": tls_secret(ca, "meshllm-router"),
        "meshllm-client-ca": {"ca.crt": _pem(ca[0])},
        "meshllm-replica-tls": tls_secret(ca, "meshllm-replicas"),
        "meshllm-router-client-tls": tls_secret(ca, "meshllm-router-client"),
        "meshllm-tenants": {"tenants.toml": f'[[tenants]]\nname = "t"\nkeys = ["{HASH}"]\n'},
        "meshllm-redis": {"url": "redis://:secret@redis.example:6379/0"},
    }


def secret_data(
    r: Rendered, users: dict[str, dict[str, str]], name: str
) -> dict[str, str]:  # fmt: skip
    data = r.secret_data(name)
    if data is None:
        assert name in users, f"{r.name}: Secret {name} is neither rendered nor a value set's own"
        data = users[name]
    return data


def mount_files(
    r: Rendered, workload: dict[str, Any], root: Path, users: dict[str, dict[str, str]]
) -> None:
    """Write under ``root`` each ConfigMap and Secret file the container mounts, as the kubelet
    would (items and key names included), so paths in the config must point at real files."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container(workload).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source = volume["configMap"]
            data = r.one("ConfigMap", source["name"])["data"]
        elif "secret" in volume:
            source = volume["secret"]
            data = secret_data(r, users, source["secretName"])
        else:
            continue
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            assert item["key"] in data, f"{r.name}: {mount['name']} wants key {item['key']}"
            target = root / mount["mountPath"].lstrip("/") / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])


def pod_env(
    r: Rendered, workload: dict[str, Any], users: dict[str, dict[str, str]]
) -> dict[str, str]:  # fmt: skip
    """The container's environment as the kubelet resolves it."""
    env: dict[str, str] = {}
    for var in container(workload).get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secret_data(r, users, ref["name"])[ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = POD_NAME
        else:
            raise AssertionError(f"unexpected env {var}")
    return env


def pod_args(workload: dict[str, Any], env: dict[str, str], root: Path) -> list[str]:
    """Arguments after the kubelet's $(VAR) expansion, with mounted paths moved under root."""
    out = []
    for raw in container(workload)["args"]:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(raw))
        out.append(f"{root}{arg}" if arg.startswith("/etc/meshllm/") else arg)
    return out


@pytest.fixture
def in_pod(
    rendered: dict[str, Rendered],
    user_secrets: dict[str, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[InPod]:
    """``in_pod(set, workload)``: mount its files under tmp_path, set its environment, rewrite
    the mounted paths in the router config; returns the container's arguments."""

    def enter(r: Rendered, workload: dict[str, Any]) -> list[str]:
        mount_files(r, workload, tmp_path, user_secrets)
        env = pod_env(r, workload, user_secrets)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = tmp_path / "etc/meshllm/config/router.toml"
        if config.exists():
            config.write_text(
                config.read_text().replace('"/etc/meshllm/', f'"{tmp_path}/etc/meshllm/')
            )
        return pod_args(workload, env, tmp_path)

    monkeypatch.delenv("MESHLLM_REDIS_URL", raising=False)
    yield enter


# --- the Helm engine: lint and render ---------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    values = load_values([CHART / "ci" / f for f in VALUE_SETS[name]])
    assert lint_chart(CHART, values) == []


def test_lint_reports_values_that_break_the_schema() -> None:
    found = lint_chart(CHART, {"catalog": [{"id": "m", "path": "p", "desired": 1}]})
    assert any("additional properties 'desired' not allowed" in f for f in found)


def test_every_value_set_renders_the_workloads(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        kinds = {m["kind"] for m in r.manifests}
        assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy",
                "PodDisruptionBudget", "ServiceAccount"} <= kinds, r.name  # fmt: skip
        assert all(m["metadata"]["namespace"] == NAMESPACE for m in r.manifests), r.name


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(
    rendered: dict[str, Rendered], version: str
) -> None:
    checked = 0
    for r in rendered.values():
        for m in r.manifests:
            if m["kind"] in CRDS:
                with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                    kubernetes_validate.validate(m, version, strict=True)
                continue
            kubernetes_validate.validate(m, version, strict=True)  # raises ValidationError
            checked += 1
    assert checked > 40


def test_kubernetes_schemas_catch_a_broken_manifest(rendered: dict[str, Rendered]) -> None:
    """The validation above can fail: a misspelt field of a rendered StatefulSet is refused."""
    broken = json.loads(json.dumps(rendered["default"].replicas))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


# --- checkov ----------------------------------------------------------------------------------

INSECURE = {"podSecurityContext": None, "containerSecurityContext": None}
"""Values that strip the security contexts: checkov must fail this render (proof it looks)."""


@pytest.fixture(scope="module")
def checkov(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """One checkov run over every value set's manifests, an insecure render, and the images."""
    assert CHECKOV.exists(), f"{CHECKOV} is missing: run `make setup` (it makes .venv-tools)"
    scan = tmp_path_factory.mktemp("checkov")
    sets = {**{r.name: r.files for r in rendered.values()},
            "insecure": render_set("default", INSECURE).files}  # fmt: skip
    for name, files in sets.items():
        (scan / name).mkdir()
        (scan / name / "manifests.yaml").write_text(manifests_text(files))
    (scan / "images").mkdir()
    for dockerfile in (ROOT / "helm" / "images").glob("*.Dockerfile"):
        (scan / "images" / dockerfile.name).write_text(dockerfile.read_text())
    done = subprocess.run(
        [str(CHECKOV), "-d", str(scan), "--framework", "kubernetes", "dockerfile",
         "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: failed checks (the insecure set)
    reports = json.loads(done.stdout)
    return reports if isinstance(reports, list) else [reports]


def _checks(reports: list[Any], outcome: str) -> list[dict[str, Any]]:
    return [c for r in reports for c in r["results"].get(outcome, [])]


def test_checkov_finds_nothing_in_the_chart_or_the_images(checkov: list[Any]) -> None:
    assert {r["check_type"] for r in checkov} == {"kubernetes", "dockerfile"}
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in _checks(checkov, "failed_checks")
              if not c["file_path"].startswith("/insecure/")]  # fmt: skip
    assert failed == []
    passed = {c["check_id"] for c in _checks(checkov, "passed_checks")}
    # what the chart is built to satisfy, checked and passed (not silently not run)
    assert {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28",
            "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_38", "CKV_K8S_40", "CKV2_K8S_6"} <= passed  # fmt: skip


def test_checkov_fails_a_render_without_security_contexts(checkov: list[Any]) -> None:
    failed = {c["check_id"] for c in _checks(checkov, "failed_checks")
              if c["file_path"].startswith("/insecure/")}  # fmt: skip
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_40"} <= failed


def test_every_checkov_skip_has_a_reason_that_the_docs_explain(checkov: list[Any]) -> None:
    skipped = _checks(checkov, "skipped_checks")
    assert skipped
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "").strip()
        assert len(reason) > 30 and reason != "No comment provided", check["check_id"]
        assert check["check_id"] in docs, f"{check['check_id']} skipped but not in docs"
    assert {c["check_id"] for c in skipped} == {
        "CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35", "CKV_DOCKER_2", "CKV_DOCKER_7"
    }  # fmt: skip


# --- the router config: the router's own loader ------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_router_loads_the_rendered_config(
    rendered: dict[str, Rendered], in_pod: InPod, name: str
) -> None:
    r = rendered[name]
    args = router_cli.parse_args(in_pod(r, r.router))
    assert str(args.config).endswith("/etc/meshllm/config/router.toml")
    config = router_cli.config_from_args(args)  # validates, reads the PEM files
    assert config == RouterConfig(**read_config_file(args.config) | _env_settings()).validate()
    assert config.port == r.values["router"]["port"]
    assert (
        config.dns
        == f"meshllm-replicas.{NAMESPACE}.svc.cluster.local:{r.values['replica']['port']}"
    )
    assert config.drain_grace_s == r.values["router"]["drainGraceSeconds"]
    assert config.metrics_port == r.values["router"]["metrics"]["port"]
    for key, value in r.values["router"]["config"].items():
        assert getattr(config, key) == value, key
    if config.auth == "api-key":
        assert Path(config.tenants_file).is_file()
        load_tenants(Path(config.tenants_file))  # parses: hashes only, known fields
    # the catalog is the values' catalog, field for field
    expected = [CatalogModel(**m) for m in r.values["catalog"]]
    assert list(config.models) == expected
    assert [(m.id, m.desired_replicas) for m in config.models] == [
        (m["id"], m.get("desired_replicas", 0)) for m in r.values["catalog"]
    ]


def _env_settings() -> dict[str, Any]:
    url = os.environ.get("MESHLLM_REDIS_URL")
    return {"redis_url": url} if url else {}


def test_router_config_keeps_strings_intact_through_toml(rendered: dict[str, Rendered]) -> None:
    """Quotes, backslashes, tabs, newlines, <|tokens|> and non-ASCII survive the chart's TOML
    quoting byte for byte (the cpu set's chat_template has all of them)."""
    r = rendered["cpu"]
    models = tomllib.loads(r.router_toml)["models"]
    (wanted,) = [m for m in r.values["catalog"] if m.get("chat_template")]
    template = models[wanted["id"]]["chat_template"]
    assert template == wanted["chat_template"]
    assert all(s in template for s in ('"', "\\", "\t", "\n", "<|im_start|>", "é"))
    assert models[wanted["id"]]["options"] == wanted["options"]


def test_router_config_shows_each_value_set(rendered: dict[str, Rendered]) -> None:
    defaults = tomllib.loads(rendered["default"].router_toml)["router"]
    assert defaults["auth"] == "api-key" and defaults["quota_store"] == "memory"
    assert not any(k.startswith(("tls_", "replica_tls_")) for k in defaults)
    redis = tomllib.loads(rendered["redis"].router_toml)["router"]
    assert redis["quota_store"] == "redis" and "redis_url" not in redis  # the URL stays out
    tls = tomllib.loads(rendered["tls"].router_toml)["router"]
    assert tls["tls_cert"] == "/etc/meshllm/tls/server/tls.crt"
    assert tls["tls_client_ca"] == "/etc/meshllm/tls/client-ca/ca.crt"
    assert tls["replica_tls_ca"] == "/etc/meshllm/tls/replica-ca/ca.crt"
    assert tls["replica_tls_cert"] == "/etc/meshllm/tls/replica-client/tls.crt"
    assert tls["replica_tls_server_name"] == f"meshllm-replicas.{NAMESPACE}.svc.cluster.local"


def test_chart_settings_and_router_config_values_cover_router_config() -> None:
    """values.schema.json lets through exactly the RouterConfig fields the chart does not set
    itself, and exactly the CatalogModel fields: a new setting in code needs the chart too."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["router"]["properties"]["config"]["properties"])
    helpers = (CHART / "templates" / "_router_config.tpl").read_text()
    managed = set(re.search(r'managedRouterSettings" -}}\n(.*)\n', helpers).group(1).split())  # type: ignore[union-attr]
    assert allowed | managed == {f.name for f in fields(RouterConfig)}
    assert not allowed & managed
    catalog = schema["properties"]["catalog"]["items"]["properties"]
    assert set(catalog) == {f.name for f in fields(CatalogModel)}
    tenant = schema["properties"]["auth"]["properties"]["tenants"]["items"]["properties"]
    assert set(tenant) == {"name", "role", "keys", *LIMITS}


# --- the replica flags: the replica's own parser -------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_replica_parses_the_rendered_flags(
    rendered: dict[str, Rendered], in_pod: InPod, name: str
) -> None:
    r = rendered[name]
    config = replica_cli.config_from_args(replica_cli.parse_args(in_pod(r, r.replicas)))
    gpu = r.values["replica"]["gpu"]["enabled"]
    assert config.device == ("cuda:0" if gpu else "cpu")
    assert config.replica_id == POD_NAME  # the StatefulSet pod name, through $(POD_NAME)
    assert config.port == r.values["replica"]["port"]
    assert config.host == "0.0.0.0"
    assert config.model is None  # idle: the router places models from its catalog
    assert config.drain_grace_s == r.values["replica"]["drainGraceSeconds"]
    assert config.metrics_port == r.values["replica"]["metrics"]["port"]
    assert bool(config.tls) == r.values["tls"]["replicas"]["enabled"]
    if r.values["tls"]["replicas"]["routerClientSecret"]:
        assert config.tls_client_ca.endswith("/etc/meshllm/tls/server/ca.crt")


# --- what the manifests must hold ------------------------------------------------------------


def test_probes_use_native_grpc_health_unless_the_server_speaks_tls(
    rendered: dict[str, Rendered],
) -> None:
    for r in rendered.values():
        for workload, port, tls in (
            (r.router, r.values["router"]["port"], r.values["tls"]["router"]["enabled"]),
            (r.replicas, r.values["replica"]["port"], r.values["tls"]["replicas"]["enabled"]),
        ):
            c = container(workload)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if tls:  # kubelet gRPC probes cannot do TLS
                    assert c[probe]["tcpSocket"] == {"port": "grpc"}, (r.name, probe)
                else:
                    assert c[probe]["grpc"] == {"port": port, "service": ""}, (r.name, probe)
    assert "grpc" in container(rendered["default"].router)["livenessProbe"]


def test_pods_run_locked_down(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for workload in r.all("Deployment") + r.all("StatefulSet"):
            spec = workload["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            sc = container(workload)["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert container(workload)["resources"]["limits"]["memory"]


def test_writable_tmp_and_cache_on_a_read_only_root(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    c = container(r.replicas)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in r.replicas["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[TMP]]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "emptyDir" in volumes[mounts[env["MESHLLM_CACHE_DIR"]]]
    router_mounts = {m["mountPath"] for m in container(r.router)["volumeMounts"]}
    assert TMP in router_mounts


def test_gpu_by_default_and_none_in_cpu_mode(rendered: dict[str, Rendered]) -> None:
    default = rendered["default"].replicas
    assert container(default)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in default[
        "spec"]["template"]["spec"]["tolerations"]  # fmt: skip
    cpu = rendered["cpu"].replicas
    assert not any("gpu" in k for k in container(cpu)["resources"]["limits"])
    assert not any("gpu" in k for k in container(cpu)["resources"].get("requests", {}))
    assert "tolerations" not in cpu["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu["spec"]["template"]["spec"]
    h100 = rendered["redis"].replicas["spec"]["template"]["spec"]
    assert h100["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_replicas_are_discovered_through_a_headless_service(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    svc = r.one("Service", "meshllm-replicas")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # loading replicas stay discoverable
    sts = r.replicas["spec"]
    assert sts["serviceName"] == "meshllm-replicas"
    assert sts["replicas"] == r.values["replica"]["count"]
    pod_labels = sts["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert tomllib.loads(r.router_toml)["router"]["dns"].startswith("meshllm-replicas.")


def test_termination_grace_outlasts_the_drain(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for workload, part in ((r.router, "router"), (r.replicas, "replica")):
            spec = workload["spec"]["template"]["spec"]
            values = r.values[part]
            pre_stop = container(workload)["lifecycle"]["preStop"]["exec"]["command"]
            assert pre_stop == ["sleep", str(values["preStopSleepSeconds"])]
            assert spec["terminationGracePeriodSeconds"] > (
                values["preStopSleepSeconds"] + values["drainGraceSeconds"]
            )
        args = container(r.replicas)["args"]
        assert args[args.index("--drain-grace") + 1] == str(
            r.values["replica"]["drainGraceSeconds"]
        )


def test_replicas_accept_traffic_only_from_router_pods(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        policy = r.one("NetworkPolicy", "meshllm-replica")
        replica_labels = r.replicas["spec"]["template"]["metadata"]["labels"]
        router_labels = r.router["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= replica_labels.items()
        grpc_rule, *metrics_rules = policy["spec"]["ingress"]
        (peer,) = grpc_rule["from"]
        assert set(peer) == {"podSelector"}  # not a namespace-wide or open rule
        selector = peer["podSelector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == "router"
        assert selector.items() <= router_labels.items()
        assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
        for rule in metrics_rules:  # only where the values open metrics to a scraper
            assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
            assert rule["from"] == r.values["networkPolicy"]["metricsFrom"]
    assert len(rendered["default"].one("NetworkPolicy", "meshllm-replica")["spec"]["ingress"]) == 1
    assert len(rendered["redis"].one("NetworkPolicy", "meshllm-replica")["spec"]["ingress"]) == 2


def test_redis_url_reaches_routers_from_a_secret_only(rendered: dict[str, Rendered]) -> None:
    for name, secret in (("redis", "meshllm-redis"), ("tls", "meshllm-redis")):
        r = rendered[name]
        env = {e["name"]: e for e in container(r.router)["env"]}
        ref = env["MESHLLM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret
        assert "redis://" not in r.router_toml
    assert "env" not in container(rendered["default"].router)
    bundled = rendered["redis"]
    url = bundled.secret_data("meshllm-redis")
    assert url is not None
    password = url["password"]
    assert (
        url["redis-url"]
        == f"redis://:{password}@meshllm-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    )
    assert f"requirepass {password}" in url["redis.conf"]
    redis = bundled.one("Deployment", "meshllm-redis")
    assert "env" not in container(redis)  # the password comes as a mounted file
    assert container(redis)["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert bundled.one("NetworkPolicy", "meshllm-redis")["spec"]["ingress"][0]["from"][0][
        "podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"  # fmt: skip


def test_tenants_come_from_a_secret_mounted_as_a_directory(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        mounts = {m["name"]: m for m in container(r.router)["volumeMounts"]}
        assert "subPath" not in mounts["tenants"]  # Secret updates reach the file: live re-read
        volume = next(v for v in r.router["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "tenants")  # fmt: skip
        wanted = r.values["auth"]["existingSecret"] or "meshllm-tenants"
        assert volume["secret"]["secretName"] == wanted
    empty = rendered["default"].secret_data("meshllm-tenants")
    assert empty is not None and "[[tenants]]" not in empty["tenants.toml"]
    assert rendered["redis"].find("Secret", "meshllm-tenants") is None  # the operator's own


def test_tls_secrets_are_mounted_where_the_flags_point(rendered: dict[str, Rendered]) -> None:
    r = rendered["tls"]
    volumes = {v["name"]: v["secret"] for v in r.router["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}  # fmt: skip
    # the router gets the replicas' CA only, never their private key
    assert volumes["tls-replica-ca"] == {"secretName": "meshllm-replica-tls", "defaultMode": 0o440,
                                         "items": [{"key": "ca.crt", "path": "ca.crt"}]}  # fmt: skip
    assert volumes["tls-server"]["secretName"] == "meshllm-router-tls"
    assert volumes["tls-client-ca"]["secretName"] == "meshllm-client-ca"
    assert volumes["tls-replica-client"]["secretName"] == "meshllm-router-client-tls"
    args = container(r.replicas)["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/meshllm/tls/server/tls.crt"
    assert args[args.index("--tls-client-ca") + 1] == "/etc/meshllm/tls/server/ca.crt"
    assert "--tls-cert" not in container(rendered["default"].replicas)["args"]


def test_model_storage_is_mounted_read_only(rendered: dict[str, Rendered]) -> None:
    for name, source in (("cpu", "hostPath"), ("redis", "persistentVolumeClaim"),
                         ("tls", "persistentVolumeClaim")):  # fmt: skip
        r = rendered[name]
        mount = next(m for m in container(r.replicas)["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True and mount["mountPath"] == "/models"
        volume = next(v for v in r.replicas["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "models")  # fmt: skip
        assert source in volume
        if source == "persistentVolumeClaim":
            assert volume[source]["readOnly"] is True
    assert rendered["tls"].find("PersistentVolumeClaim", "meshllm-models") is None  # existing
    made = rendered["redis"].one("PersistentVolumeClaim", "meshllm-models")
    assert made["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not any(
        m["name"] == "models" for m in container(rendered["default"].replicas)["volumeMounts"]
    )


def test_disruption_budgets_autoscaler_and_service_monitors(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for part in ("router", "replica"):
            pdb = r.one("PodDisruptionBudget", f"meshllm-{part}")
            assert pdb["spec"]["maxUnavailable"] == 1
    redis = rendered["redis"]
    hpa = redis.one("HorizontalPodAutoscaler", "meshllm-router")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "meshllm-router"
    assert "replicas" not in redis.router["spec"]  # the HPA owns it
    monitors = {m["metadata"]["name"]: m for m in redis.all("ServiceMonitor")}
    assert set(monitors) == {"meshllm-router", "meshllm-replica"}
    assert monitors["meshllm-replica"]["spec"]["selector"]["matchLabels"].items() <= redis.one(
        "Service", "meshllm-replicas")["metadata"]["labels"].items()  # fmt: skip
    assert rendered["default"].all("HorizontalPodAutoscaler") == []
    assert rendered["default"].all("ServiceMonitor") == []


def test_names_follow_the_release() -> None:
    """Another release name: the router's dns, the StatefulSet's serviceName and the replicas'
    NetworkPolicy all follow the headless Service's name."""
    files = render(CHART, {}, release="prod", namespace="llm")
    docs = [d for d in yaml.safe_load_all(manifests_text(files)) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ("Service", "prod-meshllm-replicas") in by_kind
    sts = by_kind[("StatefulSet", "prod-meshllm-replica")]
    assert sts["spec"]["serviceName"] == "prod-meshllm-replicas"
    toml = by_kind[("ConfigMap", "prod-meshllm-router")]["data"]["router.toml"]
    assert (
        tomllib.loads(toml)["router"]["dns"] == "prod-meshllm-replicas.llm.svc.cluster.local:50061"
    )
    router_pods = by_kind[("Deployment", "prod-meshllm-router")]["spec"]["template"]["metadata"]
    policy = by_kind[("NetworkPolicy", "prod-meshllm-replica")]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= router_pods["labels"].items()
    assert allowed["app.kubernetes.io/instance"] == "prod"


def test_router_config_change_rolls_the_routers() -> None:
    a = render_set("default").router["spec"]["template"]["metadata"]["annotations"]
    b = render_set("default", {"router": {"config": {"max_attempts": 5}}})
    assert (
        a["checksum/config"]
        != b.router["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    )


# --- values the chart refuses, with a message that names the fix ---------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"router": {"replicas": 2}}, "several routers"),
        ({"router": {"autoscaling": {"enabled": True}}}, "several routers"),
        ({"auth": {"tenants": [{"name": "t", "keys": [HASH]}], "existingSecret": "x"}}, "not both"),
        ({"quota": {"store": "redis"}}, "quota.store=redis needs"),
        ({"tls": {"router": {"enabled": True}}}, "tls.router.secretName"),
        ({"tls": {"replicas": {"routerClientSecret": "x"}}}, "needs tls.replicas.enabled"),
        ({"redis": {"url": "redis://r:6379/0", "bundled": {"enabled": True}}}, "one way"),
        ({"catalog": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]}, "appears twice"),
    ],
)
def test_render_refuses(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_set("default", values)


@pytest.mark.parametrize(
    "values",
    [
        {"auth": {"tenants": [{"name": "t", "keys": ["mk-a-clear-text-key"]}]}},
        {"router": {"config": {"tls_cert": "/x"}}},  # set by the chart from tls.*
        {"router": {"config": {"polcy": "round-robin"}}},
        {"catalog": [{"id": "m", "path": "p", "engine": "vllm"}]},
        {"quota": {"store": "sqlite"}},
    ],
)
def test_schema_refuses(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render_set("default", values)


def test_several_routers_may_opt_out_of_shared_quotas() -> None:
    r = render_set("default", {"router": {"replicas": 2}, "quota": {"store": "memory"}})
    assert tomllib.loads(r.router_toml)["router"]["quota_store"] == "memory"


def test_auth_none_mounts_no_tenants() -> None:
    r = render_set("default", {"auth": {"mode": "none"}})
    router = tomllib.loads(r.router_toml)["router"]
    assert router["auth"] == "none" and "tenants_file" not in router
    assert r.find("Secret", "meshllm-tenants") is None
    assert "AUTHENTICATION IS OFF" in r.files["meshllm/templates/NOTES.txt"]


# --- the commands the README shows ---------------------------------------------------------------


def test_readme_and_docs_chart_commands_run(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    docs = readme + (ROOT / "docs" / "kubernetes.md").read_text()
    commands = re.findall(r"^(?:\$ )?\.venv/bin/python (helm/chart\.py .*)$", docs, re.M)
    assert len(commands) >= 5
    for command in commands:
        argv = command.split(">")[0].split()[1:]
        assert chart_main([a.replace("helm/", f"{ROOT}/helm/", 1) for a in argv]) == 0, command
        out = capsys.readouterr().out
        if argv[0] == "template":
            assert list(yaml.safe_load_all(out))
    assert "helm install meshllm ./helm/meshllm" in readme


def test_chart_cli_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "chart.py"), "template", "meshllm", str(CHART),
         "-f", str(CHART / "ci" / "cpu-values.yaml"), "--notes"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "kind: StatefulSet" in done.stdout and "CPU only" in done.stdout
