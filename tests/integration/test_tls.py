"""TLS and mutual TLS, client → router → replica, with certificates generated for the session."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from conftest import StartReplica, StartRouter, demo_spec, wait_routed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshllm.api.errors import InvalidArgument, Unavailable
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client import AsyncClient, ChannelTLS, FinishReason
from meshllm.client import cli as client_cli
from meshllm.replica import cli as replica_cli
from meshllm.replica.config import ReplicaConfig
from meshllm.router import RouterConfig
from meshllm.router import cli as router_cli
from meshllm.router.config import read_config_file

PrivateKey = ec.EllipticCurvePrivateKey
SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)
GENERATION = gen.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server and a client certificate it signed, and an unrelated CA with a
    client certificate of its own."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str


def _issue(
    folder: Path,
    stem: str,
    issuer: tuple[x509.Certificate, PrivateKey] | None,
    *,
    sans: tuple[x509.GeneralName, ...] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """Write ``stem.pem`` and ``stem.key``: a self-signed CA when ``issuer`` is None, else a leaf
    certificate signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshllm test {stem}")])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    ca = _issue(d, "ca", None)
    localhost = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _issue(d, "server", ca, sans=localhost, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    _issue(d, "client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    other = _issue(d, "other-ca", None)
    _issue(d, "other-client", other, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certs(
        ca=f"{d}/ca.pem",
        server_cert=f"{d}/server.pem",
        server_key=f"{d}/server.key",
        client_cert=f"{d}/client.pem",
        client_key=f"{d}/client.key",
        other_ca=f"{d}/other-ca.pem",
        other_client_cert=f"{d}/other-client.pem",
        other_client_key=f"{d}/other-client.key",
    )


def serving(certs: Certs, client_ca: str = "") -> dict[str, str]:
    """Server-side TLS settings (the same names in ReplicaConfig and RouterConfig)."""
    return {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "tls_client_ca": client_ca}


async def stream_text(target: str, tls: ChannelTLS | None) -> tuple[str, FinishReason | None]:
    async with AsyncClient(target, tls=tls, timeout=10.0) as client:
        chunks = [
            c async for c in client.stream("Hello", model="demo", max_tokens=8, temperature=0)
        ]
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


async def refused(target: str, tls: ChannelTLS | None) -> Unavailable:
    async with AsyncClient(target, tls=tls, timeout=5.0) as client:
        with pytest.raises(Unavailable) as caught:
            await client.list_models()
    return caught.value


async def test_tls_client_router_replica(
    certs: Certs, start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec(), **serving(certs))
    # start_router waits until the replica is routed: the router reached it over TLS, checking
    # the replica's certificate against replica_tls_server_name (it names localhost).
    router = await start_router(
        replica, replica_tls_ca=certs.ca, replica_tls_server_name="localhost", **serving(certs)
    )
    text, finish = await stream_text(f"127.0.0.1:{router.port}", ChannelTLS(ca=certs.ca))
    assert finish is FinishReason.LENGTH
    assert text
    # Both servers speak TLS only: a plaintext client gets nowhere.
    for port in (replica.port, router.port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gen_grpc.GenerationStub(channel).ListModels(
                    gen.ListModelsRequest(), timeout=5.0
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_http_api_speaks_the_routers_tls_too(
    certs: Certs, start_replica: StartReplica, start_router: StartRouter
) -> None:
    """With [router.tls] the OpenAI-compatible port is HTTPS with the same certificate and, with
    a client CA, the same mutual TLS: no plaintext port beside a TLS one."""
    router = await start_router(
        await start_replica(demo_spec()), http_port=0, **serving(certs, client_ca=certs.ca)
    )
    url = f"https://localhost:{router.http_port}/v1"
    signed = openai.DefaultAsyncHttpxClient(verify=_client_context(certs), timeout=10.0)
    async with openai.AsyncOpenAI(base_url=url, api_key="x", http_client=signed) as client:
        reply = await client.completions.create(model="demo", prompt="hi", max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=certs.ca)) as unsigned:
        with pytest.raises(httpx.HTTPError):  # the handshake fails: no client certificate
            await unsigned.get(f"{url}/models")
    async with httpx.AsyncClient(timeout=5.0) as plaintext:
        with pytest.raises(httpx.HTTPError):
            await plaintext.get(f"http://localhost:{router.http_port}/v1/models")


def _client_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


async def test_client_trusting_another_ca_is_refused(
    certs: Certs, start_replica: StartReplica, start_router: StartRouter
) -> None:
    router = await start_router(await start_replica(demo_spec()), **serving(certs))
    target = f"127.0.0.1:{router.port}"
    await refused(target, ChannelTLS(ca=certs.other_ca))
    await refused(target, None)  # plaintext to a TLS router
    # The same target with the right CA works, and checks the name it is given.
    async with AsyncClient(target, tls=ChannelTLS(ca=certs.ca)) as client:
        assert [m.id for m in await client.list_models(timeout=5.0)] == ["demo"]
    await refused(target, ChannelTLS(ca=certs.ca, server_name="not-the-router.example"))


async def test_router_mutual_tls_refuses_clients_without_a_signed_certificate(
    certs: Certs, start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec())
    router = await start_router(replica, **serving(certs, client_ca=certs.ca))
    target = f"127.0.0.1:{router.port}"
    signed = ChannelTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    text, finish = await stream_text(target, signed)
    assert finish is FinishReason.LENGTH
    assert text
    await refused(target, ChannelTLS(ca=certs.ca))  # no client certificate
    await refused(
        target, ChannelTLS(ca=certs.ca, cert=certs.other_client_cert, key=certs.other_client_key)
    )


async def test_replica_mutual_tls_admits_only_a_router_with_a_certificate(
    certs: Certs,
    start_replica: StartReplica,
    start_router: StartRouter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replica = await start_replica(demo_spec(), **serving(certs, client_ca=certs.ca))
    # Routed at all (start_router waits for it) only if the handshake with the certificate works.
    good = await start_router(
        replica,
        replica_tls_ca=certs.ca,
        replica_tls_cert=certs.client_cert,
        replica_tls_key=certs.client_key,
    )
    assert [r.address for r in good.registry.ready_models()["demo"]] == [
        f"127.0.0.1:{replica.port}"
    ]
    # (stale_after_s: how long a replica may be unreachable before the router warns about it)
    anonymous = await start_router(replica, ready=0, replica_tls_ca=certs.ca, stale_after_s=0.3)
    await asyncio.sleep(1.0)  # a dozen reconnect attempts at the router's backoff
    with pytest.raises(TimeoutError):
        await wait_routed(anonymous, 1, timeout_s=0.5)
    [seen] = anonymous.registry.replicas.values()
    assert not seen.connected
    assert seen.last_error.startswith("UNAVAILABLE"), seen.last_error
    # The router says why (the operator's clue to a TLS mismatch), once per cause, not per retry.
    said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert said
    assert said[-1] == f"replica 127.0.0.1:{replica.port} unreachable: {seen.last_error}"
    assert len(set(said)) == len(said), said


async def test_client_cli_over_mutual_tls(
    certs: Certs,
    start_replica: StartReplica,
    start_router: StartRouter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    router = await start_router(await start_replica(demo_spec()), **serving(certs, certs.ca))
    flags = ["--target", f"127.0.0.1:{router.port}", "--tls-ca", certs.ca]
    client_flags = ["--tls-cert", certs.client_cert, "--tls-key", certs.client_key]
    # The sync client blocks: run it off this event loop, which serves the router.
    await asyncio.to_thread(client_cli.main, [*flags, *client_flags, "models"])
    assert capsys.readouterr().out.startswith("demo\tctranslate2")
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(client_cli.main, [*flags, "models"])
    assert str(exited.value.code).startswith("meshllm: Unavailable: ")
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(
            client_cli.main, [*flags, "--tls-cert", certs.client_cert, "models"]
        )
    assert exited.value.code == 2  # a usage error, named in one line
    assert "tls_key: must be set together with tls_cert" in capsys.readouterr().err


def _field_errors(error: InvalidArgument) -> dict[str, str]:
    """The TLS settings' violations (a router default elsewhere may add its own)."""
    return {v.field: v.description for v in error.field_violations if "tls_" in v.field}


def test_tls_settings_are_checked_with_errors_that_name_them(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        RouterConfig.from_flat({"tls_cert": certs.server_cert}).validate()
    assert _field_errors(caught.value) == {"tls_key": "must be set together with tls_cert"}
    with pytest.raises(InvalidArgument) as caught:
        RouterConfig.from_flat(
            {"tls_cert": "/nonexistent/server.pem", "tls_key": certs.server_key}
        ).validate()
    assert _field_errors(caught.value) == {
        "tls_cert": "cannot read /nonexistent/server.pem: No such file or directory"
    }
    assert "tls_cert cannot read /nonexistent/server.pem" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        RouterConfig.from_flat(
            {"tls_client_ca": certs.ca, "replica_tls_key": certs.client_key}
        ).validate()
    assert _field_errors(caught.value) == {
        "tls_client_ca": "needs tls_cert and tls_key",
        "replica_tls_cert": "must be set together with replica_tls_key",
    }
    with pytest.raises(InvalidArgument) as caught:
        ReplicaConfig(tls_cert=certs.server_cert, tls_key=certs.client_key).validate()
    assert _field_errors(caught.value) == {
        "tls_key": f"{certs.client_key} does not match the certificate in {certs.server_cert}"
    }
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(InvalidArgument) as caught:
        ReplicaConfig(
            tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=str(not_pem)
        ).validate()
    assert _field_errors(caught.value) == {"tls_client_ca": f"{not_pem} holds no PEM certificate"}
    with pytest.raises(InvalidArgument) as caught:
        ChannelTLS(cert=certs.client_key, key=certs.client_key)
    assert _field_errors(caught.value) == {
        "tls_cert": f"{certs.client_key} is not a PEM certificate"
    }
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(InvalidArgument) as caught:
        ChannelTLS(cert=certs.client_cert, key=str(encrypted))
    assert _field_errors(caught.value) == {
        "tls_key": f"{encrypted} is encrypted; gRPC needs an unencrypted key"
    }
    with pytest.raises(InvalidArgument) as caught:
        ChannelTLS(ca=str(tmp_path / "missing.pem"))
    assert (
        caught.value.message
        == f"tls_ca: cannot read {tmp_path}/missing.pem: No such file or directory"
    )
    # Plaintext stays the default everywhere.
    assert RouterConfig().tls.loaded is None
    assert RouterConfig().replica_tls.loaded is None
    assert ReplicaConfig().validate().tls is None
    assert AsyncClient("localhost:1").tls is None
    assert AsyncClient("localhost:1", tls=True).tls == ChannelTLS()


def test_router_tls_settings_in_the_config_file(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        f'[router.tls]\ncert = "{certs.server_cert}"\nkey = "{certs.server_key}"\n'
        f'[router.replica_tls]\nca = "{certs.ca}"\n'
    )
    config = RouterConfig.from_mapping(read_config_file(path))
    assert config.tls.loaded is not None
    assert not config.tls.loaded.mutual
    assert config.replica_tls.loaded == ChannelTLS(ca=certs.ca)
    path.write_text("[router.tls]\nclient_ca = true\n")
    with pytest.raises(InvalidArgument, match="client_ca must be a string"):
        read_config_file(path)


def test_router_cli_tls_flags_reach_the_config(certs: Certs) -> None:
    args = router_cli.parse_args(
        [
            "--replica",
            "10.0.0.5:50061",
            "--no-auth",
            "--tls-cert",
            certs.server_cert,
            "--tls-key",
            certs.server_key,
            "--tls-client-ca",
            certs.ca,
            "--replica-tls-ca",
            certs.other_ca,
            "--replica-tls-cert",
            certs.client_cert,
            "--replica-tls-key",
            certs.client_key,
            "--replica-tls-server-name",
            "replicas.internal",
        ]
    )
    config = router_cli.config_from_args(args)
    assert (config.tls.cert, config.tls.key, config.tls.client_ca) == (
        certs.server_cert,
        certs.server_key,
        certs.ca,
    )
    assert config.tls.loaded is not None
    assert config.tls.loaded.mutual
    assert config.replica_tls.loaded == ChannelTLS(
        ca=certs.other_ca,
        cert=certs.client_cert,
        key=certs.client_key,
        server_name="replicas.internal",
    )
    plain = router_cli.config_from_args(
        router_cli.parse_args(["--replica", "10.0.0.5:50061", "--no-auth"])
    )
    assert plain.tls.loaded is None
    assert plain.replica_tls.loaded is None


def test_replica_cli_tls_flags_reach_the_config(certs: Certs) -> None:
    args = replica_cli.parse_args(
        [
            "--tls-cert",
            certs.server_cert,
            "--tls-key",
            certs.server_key,
            "--tls-client-ca",
            certs.ca,
        ]
    )
    config = replica_cli.config_from_args(args)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
        certs.server_cert,
        certs.server_key,
        certs.ca,
    )
    assert config.tls is not None
    assert config.tls.mutual
    with pytest.raises(InvalidArgument, match="tls_key: must be set together with tls_cert"):
        replica_cli.config_from_args(replica_cli.parse_args(["--tls-cert", certs.server_cert]))


async def health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5.0)
    return int(reply.status)


async def test_a_plaintext_health_port_lets_probes_reach_tls_servers(
    certs: Certs, start_replica: StartReplica, start_router: StartRouter
) -> None:
    """Kubelet gRPC probes cannot speak TLS: with ``health_port`` a TLS server also answers
    grpc.health.v1, and only that, in plaintext, with the same statuses as its main port."""
    replica = await start_replica(None, health_port=0, **serving(certs, client_ca=certs.ca))
    assert replica.health_port and replica.replica is not None
    assert await health(replica.health_port, "") == SERVING  # idle: a worker waiting for a model
    assert await health(replica.health_port, GENERATION) == NOT_SERVING
    await replica.replica.load(demo_spec(), wait=True)
    assert await health(replica.health_port, GENERATION) == SERVING
    router = await start_router(
        replica,
        health_port=0,
        replica_tls_ca=certs.ca,
        replica_tls_cert=certs.client_cert,
        replica_tls_key=certs.client_key,
        **serving(certs),
    )
    assert router.health_port
    assert await health(router.health_port, GENERATION) == SERVING
    for port in (replica.health_port, router.health_port):  # health only: no way to the models
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gen_grpc.GenerationStub(channel).ListModels(
                    gen.ListModelsRequest(), timeout=5.0
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # A stopping router tells a watching probe NOT_SERVING before the port closes.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.health_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        seen = [(await watch.read()).status]
        await router.stop(grace_s=0.5)
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (reply := await watch.read()) is not grpc.aio.EOF:
                seen.append(reply.status)
    assert seen[:2] == [SERVING, NOT_SERVING]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health(router.health_port, "")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_flags_reach_the_configs() -> None:
    router = router_cli.config_from_args(
        router_cli.parse_args(["--replica", "10.0.0.5:50061", "--no-auth", "--health-port", "8081"])
    )
    assert router.health_port == 8081
    replica = replica_cli.config_from_args(replica_cli.parse_args(["--health-port", "8082"]))
    assert replica.health_port == 8082
    assert (
        router_cli.config_from_args(
            router_cli.parse_args(["--replica", "10.0.0.5:50061", "--no-auth"])
        ).health_port
        is None
    )
    with pytest.raises(InvalidArgument, match="health_port: 70000 is out of range"):
        ReplicaConfig(health_port=70000).validate()
    with pytest.raises(InvalidArgument, match="health_port"):
        RouterConfig.from_flat(
            {"replicas": ("10.0.0.5:50061",), "auth": "none", "health_port": -1}
        ).validate()
