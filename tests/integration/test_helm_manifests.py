"""What the chart's manifests must hold, for the default values and each helm/meshllm/ci value
set: probes, security contexts, GPU resources, discovery, drain, NetworkPolicies, where Secrets
reach the pods, storage, disruption budgets and autoscaling."""

from __future__ import annotations

import tomllib

import helm_python as helm
import pytest
import yaml
from chart import manifests_text, render
from chart_render import CHART, NAMESPACE, Rendered, container, render_all, render_set

from meshllm.router.placement import parse_catalog

TMP = "/tmp"  # noqa: S108  (the pods' emptyDir mount point, not a file of this test)


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return render_all()


# --- what the manifests must hold ------------------------------------------------------------


def test_probes_use_native_grpc_health_on_a_plaintext_port(rendered: dict[str, Rendered]) -> None:
    """Kubelet gRPC probes cannot speak TLS: a server with TLS on is probed on its health-only
    plaintext port, which the pod declares; without TLS, on the main port."""
    for r in rendered.values():
        for workload, values, tls in (
            (r.router, r.values["router"], r.values["tls"]["router"]["enabled"]),
            (r.replicas, r.values["replica"], r.values["tls"]["replicas"]["enabled"]),
        ):
            c = container(workload)
            port = values["healthPort"] if tls else values["port"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert c[probe] == c[probe] | {"grpc": {"port": port, "service": ""}}, (
                    r.name,
                    probe,
                )
            declared = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert declared.get("health") == (port if tls else None), r.name
    tls = rendered["tls"]
    assert tls.values["tls"]["router"]["enabled"] and tls.values["tls"]["replicas"]["enabled"]


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
        "spec"
    ]["template"]["spec"]["tolerations"]
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
    assert tomllib.loads(r.router_toml)["router"]["discovery"]["dns"].startswith(
        "meshllm-replicas."
    )


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


def test_redis_url_reaches_routers_from_a_secret_file_only(rendered: dict[str, Rendered]) -> None:
    for name, key in (("redis", "redis-url"), ("tls", "url")):
        r = rendered[name]
        router = container(r.router)
        assert "env" not in router  # no variable carries it (checkov CKV_K8S_35)
        mounts = {m["name"]: m for m in router["volumeMounts"]}
        assert mounts["redis-url"] == {
            "name": "redis-url",
            "mountPath": "/etc/meshllm/redis",
            "readOnly": True,
        }
        volumes = {v["name"]: v for v in r.router["spec"]["template"]["spec"]["volumes"]}
        assert volumes["redis-url"]["secret"] == {  # only the URL, not the password or redis.conf
            "secretName": "meshllm-redis",
            "defaultMode": 0o440,
            "items": [{"key": key, "path": "url"}],
        }
        assert "redis://" not in r.router_toml  # the ConfigMap carries only the path
        redis = tomllib.loads(r.router_toml)["router"]["redis"]
        assert redis["url_file"] == "/etc/meshllm/redis/url" and "url" not in redis
    default = container(rendered["default"].router)
    assert "env" not in default
    assert "redis-url" not in {m["name"] for m in default["volumeMounts"]}
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
    assert (
        bundled.one("NetworkPolicy", "meshllm-redis")["spec"]["ingress"][0]["from"][0][
            "podSelector"
        ]["matchLabels"]["app.kubernetes.io/component"]
        == "router"
    )


def test_tenants_come_from_a_secret_mounted_as_a_directory(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        mounts = {m["name"]: m for m in container(r.router)["volumeMounts"]}
        assert "subPath" not in mounts["tenants"]  # Secret updates reach the file: live re-read
        volume = next(
            v for v in r.router["spec"]["template"]["spec"]["volumes"] if v["name"] == "tenants"
        )
        wanted = r.values["auth"]["existingSecret"] or "meshllm-tenants"
        assert volume["secret"]["secretName"] == wanted
    empty = rendered["default"].secret_data("meshllm-tenants")
    assert empty is not None and "[[tenants]]" not in empty["tenants.toml"]
    assert rendered["redis"].find("Secret", "meshllm-tenants") is None  # the operator's own


def test_tls_secrets_are_mounted_where_the_flags_point(rendered: dict[str, Rendered]) -> None:
    r = rendered["tls"]
    volumes = {
        v["name"]: v["secret"]
        for v in r.router["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    # the router gets the replicas' CA only, never their private key
    assert volumes["tls-replica-ca"] == {
        "secretName": "meshllm-replica-tls",
        "defaultMode": 0o440,
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert volumes["tls-server"]["secretName"] == "meshllm-router-tls"
    assert volumes["tls-client-ca"]["secretName"] == "meshllm-client-ca"
    assert volumes["tls-replica-client"]["secretName"] == "meshllm-router-client-tls"
    args = container(r.replicas)["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/meshllm/tls/server/tls.crt"
    assert args[args.index("--tls-client-ca") + 1] == "/etc/meshllm/tls/server/ca.crt"
    assert "--tls-cert" not in container(rendered["default"].replicas)["args"]


def test_model_storage_is_mounted_read_only(rendered: dict[str, Rendered]) -> None:
    for name, source in (
        ("cpu", "hostPath"),
        ("redis", "persistentVolumeClaim"),
        ("tls", "persistentVolumeClaim"),
    ):
        r = rendered[name]
        mount = next(m for m in container(r.replicas)["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True and mount["mountPath"] == "/models"
        volume = next(
            v for v in r.replicas["spec"]["template"]["spec"]["volumes"] if v["name"] == "models"
        )
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
    assert (
        monitors["meshllm-replica"]["spec"]["selector"]["matchLabels"].items()
        <= redis.one("Service", "meshllm-replicas")["metadata"]["labels"].items()
    )
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
        tomllib.loads(toml)["router"]["discovery"]["dns"]
        == "prod-meshllm-replicas.llm.svc.cluster.local:50061"
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


def test_catalog_routing_settings_reach_the_router_config() -> None:
    """A catalog model's routing policy and affinity knobs render into its [models.<id>] table
    and parse as the router parses them; the schema refuses unknown policies and bad knobs."""
    toml = tomllib.loads(render_set("cpu").router_toml)
    models = {m.id: m for m in parse_catalog(toml["models"])}
    qwen, demo = models["qwen2.5-0.5b-instruct"], models["demo"]
    assert (qwen.routing, qwen.affinity_load_factor, qwen.affinity_prefix_chars) == (
        "affinity",
        2,
        512,
    )
    assert (demo.routing, demo.affinity_load_factor) == ("power-of-two", 1.25)
    r = render_set(
        "default",
        {"catalog": [{"id": "m", "path": "p", "routing": "affinity", "affinity_load_factor": 1.5}]},
    )
    (model,) = parse_catalog(tomllib.loads(r.router_toml)["models"])
    assert (model.routing, model.affinity_load_factor) == ("affinity", 1.5)
    policy = render_set("default", {"router": {"config": {"policy": "power-of-two"}}})
    assert tomllib.loads(policy.router_toml)["router"]["policy"] == "power-of-two"
    for bad in (
        {"routing": "sticky"},
        {"affinity_load_factor": 0.5},
        {"affinity_prefix_chars": -1},
    ):
        with pytest.raises(helm.HelmValuesError):
            render_set("default", {"catalog": [{"id": "m", "path": "p", **bad}]})
