"""The meshllm chart rendered for tests: value sets, the rendered manifests, and what a pod of
them would see (its mounted files, environment and arguments). Used by tests/e2e/test_helm.py and tests/integration/test_helm_manifests.py."""

from __future__ import annotations

import base64
import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from chart import load_values, manifests_text, render
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "meshllm"
NAMESPACE = "meshllm"
VALUE_SETS = {
    "default": (),
    "cpu": ("cpu-values.yaml",),
    "redis": ("redis-values.yaml",),
    "tls": ("tls-values.yaml",),
}
POD_NAME = "meshllm-replica-0"
HASH = "sha256:" + "ab" * 32


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


def render_all() -> dict[str, Rendered]:
    return {name: render_set(name) for name in VALUE_SETS}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


# --- files the pods would see ----------------------------------------------------------------


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cert(
    cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
    return cert, key


def tls_secret(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str) -> dict[str, str]:
    """A kubernetes.io/tls Secret's data as cert-manager writes it."""
    cert, key = _cert(cn, ca)
    return {"tls.crt": _pem(cert), "tls.key": _pem(key), "ca.crt": _pem(ca[0])}


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


def secret_data(r: Rendered, users: dict[str, dict[str, str]], name: str) -> dict[str, str]:
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
) -> dict[str, str]:
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
