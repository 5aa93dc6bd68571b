"""The Helm chart (helm/meshllm) through Helm's own engine (helm-python-sdk, offline), for the
default values and each value set in helm/meshllm/ci: lint is clean, every manifest validates
against the Kubernetes schemas, checkov finds nothing (each skip carries a reason that
docs/kubernetes.md explains), the router config and replica flags the chart renders are loaded by
the router's and the replica's own code with the files the pods would see, and bad values are
refused with a message naming the fix. What the manifests hold: test_helm_manifests.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from chart import lint as lint_chart
from chart import load_values, manifests_text
from chart import main as chart_main
from chart_render import (
    CHART,
    HASH,
    NAMESPACE,
    POD_NAME,
    ROOT,
    VALUE_SETS,
    Rendered,
    container,
    mount_files,
    pod_args,
    pod_env,
    render_all,
    render_set,
    user_secrets,
)

from meshllm.api.spec import SPEC_FIELDS
from meshllm.replica import cli as replica_cli
from meshllm.router import cli as router_cli
from meshllm.router.config import FLAT_NAMES, SECTIONS, RouterConfig, read_config_file
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.tenants import TENANT_FIELDS, load_tenants

CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
KUBE_VERSIONS = ("1.27.0", "1.37.0")  # the chart's kubeVersion floor and the newest schemas
CRDS = {"ServiceMonitor"}  # Prometheus Operator kinds: no schema in kubernetes-validate
InPod = Callable[[Rendered, dict[str, Any]], list[str]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return render_all()


@pytest.fixture(scope="module", name="user_secrets")
def user_secrets_fixture() -> dict[str, dict[str, str]]:
    return user_secrets()


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
        assert {
            "Deployment",
            "StatefulSet",
            "Service",
            "ConfigMap",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "ServiceAccount",
        } <= kinds, r.name
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
    sets = {
        **{r.name: r.files for r in rendered.values()},
        "insecure": render_set("default", INSECURE).files,
    }
    for name, files in sets.items():
        (scan / name).mkdir()
        (scan / name / "manifests.yaml").write_text(manifests_text(files))
    (scan / "images").mkdir()
    for dockerfile in (ROOT / "helm" / "images").glob("*.Dockerfile"):
        (scan / "images" / dockerfile.name).write_text(dockerfile.read_text())
    done = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(scan),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: failed checks (the insecure set)
    reports = json.loads(done.stdout)
    return reports if isinstance(reports, list) else [reports]


def _checks(reports: list[Any], outcome: str) -> list[dict[str, Any]]:
    return [c for r in reports for c in r["results"].get(outcome, [])]


def test_checkov_finds_nothing_in_the_chart_or_the_images(checkov: list[Any]) -> None:
    assert {r["check_type"] for r in checkov} == {"kubernetes", "dockerfile"}
    failed = [
        (c["check_id"], c["resource"], c["file_path"])
        for c in _checks(checkov, "failed_checks")
        if not c["file_path"].startswith("/insecure/")
    ]
    assert failed == []
    passed = {c["check_id"] for c in _checks(checkov, "passed_checks")}
    # what the chart is built to satisfy, checked and passed (not silently not run)
    assert {
        "CKV_K8S_8",
        "CKV_K8S_9",
        "CKV_K8S_20",
        "CKV_K8S_22",
        "CKV_K8S_23",
        "CKV_K8S_28",
        "CKV_K8S_31",
        "CKV_K8S_35",
        "CKV_K8S_37",
        "CKV_K8S_38",
        "CKV_K8S_40",
        "CKV2_K8S_6",
    } <= passed


def test_checkov_fails_a_render_without_security_contexts(checkov: list[Any]) -> None:
    failed = {
        c["check_id"]
        for c in _checks(checkov, "failed_checks")
        if c["file_path"].startswith("/insecure/")
    }
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
        "CKV_K8S_43",
        "CKV_K8S_15",
        "CKV_DOCKER_2",
        "CKV_DOCKER_7",
    }


# --- the router config: the router's own loader ------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_router_loads_the_rendered_config(
    rendered: dict[str, Rendered],
    user_secrets: dict[str, dict[str, str]],
    in_pod: InPod,
    name: str,
) -> None:
    r = rendered[name]
    args = router_cli.parse_args(in_pod(r, r.router))
    assert str(args.config).endswith("/etc/meshllm/config/router.toml")
    config = router_cli.config_from_args(args)  # validates, reads the PEM and Redis URL files
    assert config == RouterConfig.from_mapping(read_config_file(args.config)).validate()
    assert config.port == r.values["router"]["port"]
    assert (
        config.discovery.dns
        == f"meshllm-replicas.{NAMESPACE}.svc.cluster.local:{r.values['replica']['port']}"
    )
    assert config.drain_grace_s == r.values["router"]["drainGraceSeconds"]
    assert config.metrics_port == r.values["router"]["metrics"]["port"]
    http = r.values["router"]["http"]
    assert config.http.port == (http["port"] if http["enabled"] else None)
    tls = r.values["tls"]["router"]["enabled"]
    assert config.health_port == (r.values["router"]["healthPort"] if tls else None)
    flat = RouterConfig.from_flat(r.values["router"]["config"])  # the chart's pass-through settings
    for key in r.values["router"]["config"]:
        section, name = FLAT_NAMES.get(key, ("", key))
        assert getattr(getattr(config, section) if section else config, name) == getattr(
            getattr(flat, section) if section else flat, name
        ), key
    # the Redis URL comes from the mounted Secret file, and only there
    assert config.redis.url == ""
    assert config.redis.address() == _redis_url(r, user_secrets)
    # placement counts are shared through Redis exactly when the chart uses Redis
    assert config.placement.share_counts == (config.quota.store == "redis")
    if config.auth == "api-key":
        assert Path(config.tenants_file).is_file()
        tenants = load_tenants(Path(config.tenants_file))  # parses: hashes only, known fields
        if not r.values["auth"]["existingSecret"]:  # written from values, ceilings included
            assert {t.name: t.max_priority for t in tenants} == {
                t["name"]: t.get("max_priority", 0) for t in r.values["auth"]["tenants"]
            }
    # the catalog is the values' catalog, field for field
    expected = [CatalogModel.of(**m) for m in r.values["catalog"]]
    assert list(config.models) == expected
    assert [(m.id, m.desired_replicas) for m in config.models] == [
        (m["id"], m.get("desired_replicas", 0)) for m in r.values["catalog"]
    ]


def _redis_url(r: Rendered, users: dict[str, dict[str, str]]) -> str:
    """The URL the value set's Redis Secret holds ("" without Redis)."""
    redis = r.values["redis"]
    if redis["existingSecret"]:
        return users[redis["existingSecret"]][redis["existingSecretKey"]]
    return (r.secret_data("meshllm-redis") or {}).get("redis-url", "")


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
    for r in rendered.values():  # the nested layout: no flat names left in [router]
        assert not set(tomllib.loads(r.router_toml)["router"]) & set(FLAT_NAMES), r.name
    defaults = tomllib.loads(rendered["default"].router_toml)["router"]
    assert defaults["auth"] == "api-key" and defaults["quota"] == {"store": "memory"}
    assert not {"redis", "placement", "tls", "replica_tls"} & set(defaults)
    redis = tomllib.loads(rendered["redis"].router_toml)["router"]
    assert redis["quota"]["store"] == "redis" and "url" not in redis["redis"]  # the URL stays out
    assert redis["redis"]["url_file"] == "/etc/meshllm/redis/url"  # a Secret mounted there
    # Redis shares desired replica counts too (the router no longer infers it from the store)
    assert redis["placement"]["share_counts"] is True
    assert "share_counts" not in defaults.get("placement", {})
    tls = tomllib.loads(rendered["tls"].router_toml)["router"]
    assert tls["tls"]["cert"] == "/etc/meshllm/tls/server/tls.crt"
    assert tls["tls"]["client_ca"] == "/etc/meshllm/tls/client-ca/ca.crt"
    assert tls["replica_tls"]["ca"] == "/etc/meshllm/tls/replica-ca/ca.crt"
    assert tls["replica_tls"]["cert"] == "/etc/meshllm/tls/replica-client/tls.crt"
    assert tls["replica_tls"]["server_name"] == f"meshllm-replicas.{NAMESPACE}.svc.cluster.local"
    assert tls["placement"]["share_counts"] is True  # an external Redis, same as bundled


def test_chart_settings_and_router_config_values_cover_router_config() -> None:
    """values.schema.json lets through exactly the RouterConfig fields the chart does not set
    itself, and exactly the CatalogModel fields: a new setting in code needs the chart too."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["router"]["properties"]["config"]["properties"])
    helpers = (CHART / "templates" / "_router_config.tpl").read_text()
    managed = set(re.search(r'managedRouterSettings" -}}\n(.*)\n', helpers).group(1).split())  # type: ignore[union-attr]
    flat_names = {f.name for f in fields(RouterConfig) if f.name not in SECTIONS} | set(FLAT_NAMES)
    assert allowed | managed == flat_names
    assert not allowed & managed
    # router.config takes flat names; the chart places each where the router's FLAT_NAMES does
    block = re.search(r'routerFlatNames" -}}\n(.*?)\n\{\{- end', helpers, re.S)
    assert block is not None
    placed = yaml.safe_load(block.group(1))
    assert placed == {name: f"{part}.{key}" for name, (part, key) in FLAT_NAMES.items()}
    catalog = schema["properties"]["catalog"]["items"]["properties"]
    assert set(catalog) == set(SPEC_FIELDS) | {f.name for f in fields(CatalogModel)} - {"spec"}
    tenant = schema["properties"]["auth"]["properties"]["tenants"]["items"]["properties"]
    assert set(tenant) == TENANT_FIELDS


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
    # probed there (kubelet gRPC probes cannot speak TLS)
    assert config.health_port == (r.values["replica"]["healthPort"] if config.tls else None)
    if r.values["tls"]["replicas"]["routerClientSecret"]:
        assert config.tls_client_ca.endswith("/etc/meshllm/tls/server/ca.crt")


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
        ({"serviceMonitor": {"enabled": True}}, "needs networkPolicy.metricsFrom"),
        (
            {
                "serviceMonitor": {"enabled": True},
                "router": {"metrics": {"enabled": False}},
                "replica": {"metrics": {"enabled": False}},
                "networkPolicy": {"enabled": False},
            },
            "nothing to scrape",
        ),
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
        {"router": {"config": {"redis_url_file": "/x"}}},  # set by the chart from redis.*
        {"router": {"config": {"share_placement_counts": False}}},  # on with the chart's Redis
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
    assert tomllib.loads(r.router_toml)["router"]["quota"]["store"] == "memory"


def test_http_api_has_a_container_port_a_service_port_and_the_network_policy() -> None:
    """The OpenAI-compatible HTTP API: [router.http] port, a container port and a Service port
    named http, and the same NetworkPolicy rule as gRPC; off, none of them."""
    on = render_set(
        "default", {"router": {"http": {"port": 8000}}, "networkPolicy": {"enabled": True}}
    )
    assert tomllib.loads(on.router_toml)["router"]["http"] == {"port": 8000}
    ports = {p["name"]: p["containerPort"] for p in container(on.router)["ports"]}
    assert ports["http"] == 8000
    service = on.one("Service", "meshllm-router")["spec"]["ports"]
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"} in service
    policy = on.one("NetworkPolicy", "meshllm-router")["spec"]["ingress"][0]["ports"]
    assert {"port": "http", "protocol": "TCP"} in policy
    off = render_set("default", {"router": {"http": {"enabled": False}}})
    assert "http" not in tomllib.loads(off.router_toml)["router"]
    assert "http" not in {p["name"] for p in container(off.router)["ports"]}
    assert "http" not in {p["name"] for p in off.one("Service", "meshllm-router")["spec"]["ports"]}


def test_auth_none_mounts_no_tenants() -> None:
    r = render_set("default", {"auth": {"mode": "none"}})
    router = tomllib.loads(r.router_toml)["router"]
    assert router["auth"] == "none" and "tenants_file" not in router
    assert r.find("Secret", "meshllm-tenants") is None
    assert "AUTHENTICATION IS OFF" in r.files["meshllm/templates/NOTES.txt"]


MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


@pytest.mark.parametrize("policy", [True, False])
def test_every_service_monitor_scrapes_a_port_the_policy_opens(policy: bool) -> None:
    values = {
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {"enabled": policy, "metricsFrom": MONITORING if policy else []},
    }
    r = render_set("default", values)
    monitors = r.all("ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"meshllm-router", "meshllm-replica"}
    for monitor in monitors:
        part = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        policies = [p for p in r.all("NetworkPolicy") if p["metadata"]["name"] == f"meshllm-{part}"]
        if not policy:
            assert policies == []
            continue
        (policy_doc,) = policies
        opened = [
            rule["from"]
            for rule in policy_doc["spec"]["ingress"]
            if {"port": "metrics", "protocol": "TCP"} in rule["ports"]
        ]
        assert opened == [MONITORING], part


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
        [
            sys.executable,
            str(ROOT / "helm" / "chart.py"),
            "template",
            "meshllm",
            str(CHART),
            "-f",
            str(CHART / "ci" / "cpu-values.yaml"),
            "--notes",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "kind: StatefulSet" in done.stdout and "CPU only" in done.stdout
