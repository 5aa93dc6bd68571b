"""Quota arithmetic with an injected clock, tenants files and API-key matching: no servers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import DAY, Clock
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from meshllm.api.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.admission import Admission, QuotaMetrics
from meshllm.router.auth import Authenticator, TenantsFile
from meshllm.router.cli import config_from_args, keys_command, parse_args
from meshllm.router.config import RouterConfig
from meshllm.router.quota import Demand, QuotaExceeded, TenantLimits
from meshllm.router.quota.memory import MemoryQuotaStore
from meshllm.router.request import RoutedRequest, prompt_estimate
from meshllm.router.tenants import ANONYMOUS, Role, Tenant, hash_key, load_tenants
from meshllm.server.metrics import RequestRecord


def store(clock: Clock) -> MemoryQuotaStore:
    return MemoryQuotaStore(concurrency_retry_s=0.5, clock=clock)


async def exceeded(s: MemoryQuotaStore, limits: TenantLimits, tokens: int = 0) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        await s.reserve("t", limits, Demand(tokens))
    return info.value


async def test_requests_bucket_bursts_a_minute_then_refills_exactly() -> None:
    clock, limits = Clock(), TenantLimits(requests_per_minute=6)  # one request per 10 s
    s = store(clock)
    for left in range(5, -1, -1):  # the whole minute at once (burst)
        assert (await s.reserve("t", limits, Demand(0))).remaining.remaining_requests == left
    e = await exceeded(s, limits)
    assert [v.limit for v in e.violations] == ["requests_per_minute"]
    assert e.violations[0].retry_after_s == pytest.approx(10.0)
    clock.now += 9.999
    assert (await exceeded(s, limits)).violations[0].retry_after_s == pytest.approx(0.001, abs=1e-6)
    clock.now += 0.001  # exactly one refilled
    await s.reserve("t", limits, Demand(0))
    await exceeded(s, limits)
    clock.now += 600  # a long pause refills to the capacity, not beyond it
    r = None
    for _ in range(6):
        r = await s.reserve("t", limits, Demand(0))
    assert r is not None and r.remaining.remaining_requests == 0
    await exceeded(s, limits)


async def test_tokens_reserve_then_settle_with_the_real_count() -> None:
    clock, limits = Clock(), TenantLimits(tokens_per_minute=600)  # 10 tokens per second
    s = store(clock)
    a = await s.reserve("t", limits, Demand(500))
    assert a.remaining.remaining_tokens == 100
    assert a.remaining.reset_tokens_s == pytest.approx(50.0)
    e = await exceeded(s, limits, 200)
    assert e.violations[0].retry_after_s == pytest.approx(10.0)  # 100 more at 10/s
    await s.settle(a, 120)  # used 120 of 500: 380 come back
    b = await s.reserve("t", limits, Demand(200))
    assert b.remaining.remaining_tokens == 280
    await s.settle(b, 300)  # used more than reserved: the extra 100 is charged
    usage = {u.limit: u for u in await s.usage("t", limits)}
    assert usage["tokens_per_minute"].used == 600 - 180
    clock.now += 60
    assert {u.limit: u.used for u in await s.usage("t", limits)}["tokens_per_minute"] == 0


async def test_a_request_larger_than_the_limit_can_never_be_admitted() -> None:
    s = store(Clock())
    e = await exceeded(s, TenantLimits(tokens_per_minute=100, tokens_per_day=1000), 1500)
    assert {v.limit: v.retry_after_s for v in e.violations} == {
        "tokens_per_minute": None,
        "tokens_per_day": None,
    }


async def test_concurrent_requests_free_their_slot_when_settled() -> None:
    limits = TenantLimits(concurrent_requests=2)
    s = store(Clock())
    a = await s.reserve("t", limits, Demand(10))
    await s.reserve("t", limits, Demand(10))
    e = await exceeded(s, limits)
    assert [(v.limit, v.retry_after_s) for v in e.violations] == [("concurrent_requests", 0.5)]
    await s.settle(a, 3)
    await s.reserve("t", limits, Demand(10))
    assert {u.limit: u.used for u in await s.usage("t", limits)} == {"concurrent_requests": 2}


async def test_tokens_per_day_roll_over_at_utc_midnight() -> None:
    clock = Clock(1_000 * DAY + DAY - 30.0)  # 30 s before midnight UTC
    limits = TenantLimits(tokens_per_day=1000)
    s = store(clock)
    late = await s.reserve("t", limits, Demand(900))
    e = await exceeded(s, limits, 200)
    assert e.violations[0].limit == "tokens_per_day"
    assert e.violations[0].retry_after_s == pytest.approx(30.0)
    clock.now += 30.0  # a new day: the whole allowance again
    new_day = await s.reserve("t", limits, Demand(1000))
    # yesterday's reservation settling today gives nothing back to today's count
    await s.settle(late, 0)
    await exceeded(s, limits, 1)
    await s.settle(new_day, 400)
    usage = {u.limit: u for u in await s.usage("t", limits)}["tokens_per_day"]
    assert (usage.used, usage.limit_value) == (400, 1000)
    assert usage.resets_in_s == pytest.approx(DAY)


async def test_admission_is_all_or_nothing_across_limits() -> None:
    limits = TenantLimits(requests_per_minute=10, tokens_per_minute=100)
    s = store(Clock())
    await s.reserve("t", limits, Demand(90))
    e = await exceeded(s, limits, 20)  # tokens refuse it: the request slot is not taken either
    assert [v.limit for v in e.violations] == ["tokens_per_minute"]
    usage = {u.limit: u.used for u in await s.usage("t", limits)}
    assert usage == {"requests_per_minute": 1, "tokens_per_minute": 90}


async def test_tenants_are_separate() -> None:
    limits = TenantLimits(requests_per_minute=1)
    s = store(Clock())
    await s.reserve("a", limits, Demand(0))
    await s.reserve("b", limits, Demand(0))
    with pytest.raises(QuotaExceeded):
        await s.reserve("a", limits, Demand(0))


def test_remaining_headers_name_only_the_limits_that_are_set() -> None:
    async def run() -> dict[str, str]:
        r = await store(Clock()).reserve("t", TenantLimits(requests_per_minute=60), Demand(5))
        return dict(r.remaining.headers())

    assert asyncio.run(run()) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1.000",
    }


def test_prompt_estimate_counts_every_input_form() -> None:
    assert prompt_estimate(gen.GenerateRequest(token_ids=[1, 2, 3])) == 3
    assert prompt_estimate(gen.GenerateRequest(prompt="x" * 40)) == 10
    chat = gen.GenerateRequest(messages=[gen.ChatMessage(role="user", content="y" * 36)])
    assert prompt_estimate(chat) == math.ceil(40 / 4) + 4


# -- admission: errors with details ----------------------------------------------------------


@contextlib.asynccontextmanager
async def admitted(  # noqa: PLR0917 (mirrors the router's call)
    admission: Admission,
    tenant: Tenant,
    request: gen.GenerateRequest,
    budget: Callable[[], int],
    record: RequestRecord,
    span: trace.Span,
) -> AsyncIterator[tuple[tuple[str, str], ...]]:
    """What the router does around one request: reserve, run, settle with what it used."""
    routed = RoutedRequest(request, record, span, prompt_estimate(request))
    held = await admission.reserve(tenant, routed.prompt_estimate + budget(), span)
    try:
        yield held.remaining.headers() if held is not None else ()
    finally:
        if held is not None:
            await admission.settle(held, routed.tokens_used())


async def test_admission_refusals_carry_retry_info_and_quota_failure() -> None:
    clock = Clock()
    admission = Admission(store(clock), "deny", 1.0, QuotaMetrics(CollectorRegistry()))
    tenant = Tenant(name="t", role=Role.USER, limits=TenantLimits(requests_per_minute=2))
    request = gen.GenerateRequest(model="m", prompt="hi", max_tokens=4)
    span, record = trace.INVALID_SPAN, RequestRecord(model="m")
    for _ in range(2):
        async with admitted(admission, tenant, request, lambda: 4, record, span) as headers:
            assert dict(headers)["x-ratelimit-limit-requests"] == "2"  # reserved
    with pytest.raises(ResourceExhausted) as info:
        async with admitted(admission, tenant, request, lambda: 4, record, span):
            pass
    e = info.value
    assert e.reason == "QUOTA_EXCEEDED"
    assert e.retry_after == pytest.approx(30.0)
    assert [q.subject for q in e.quota_violations] == ["tenant:t"]
    assert "requests_per_minute" in e.quota_violations[0].description
    big = Tenant(name="b", role=Role.USER, limits=TenantLimits(tokens_per_minute=10))
    with pytest.raises(InvalidArgument) as too_big:
        async with admitted(admission, big, request, lambda: 100, record, span):
            pass
    assert too_big.value.reason == "REQUEST_EXCEEDS_QUOTA"
    assert [v.field for v in too_big.value.field_violations] == ["max_tokens"]


async def test_a_cancelled_request_still_settles() -> None:
    clock = Clock()
    s = store(clock)
    admission = Admission(s, "deny", 1.0, QuotaMetrics(CollectorRegistry()))
    limits = TenantLimits(tokens_per_minute=1000, concurrent_requests=1)
    tenant = Tenant(name="t", role=Role.USER, limits=limits)
    request = gen.GenerateRequest(model="m", token_ids=[1] * 10, max_tokens=500)
    started = asyncio.Event()

    async def run() -> None:
        record = RequestRecord(model="m")
        async with admitted(admission, tenant, request, lambda: 500, record, trace.INVALID_SPAN):
            record.completion_tokens = 7
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(run())
    await started.wait()
    assert {u.limit: u.used for u in await s.usage("t", limits)}["tokens_per_minute"] == 510
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    usage = {u.limit: u.used for u in await s.usage("t", limits)}
    assert usage == {"tokens_per_minute": 17, "concurrent_requests": 0}  # 10 prompt + 7 streamed


# -- tenants and keys ------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def test_tenants_file_loads_roles_limits_and_hashes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[[tenants]]
name = "ops"
role = "admin"
keys = ["{hash_key("k-admin")}"]

[[tenants]]
name = "batch"
keys = ["{hash_key("k1")}", "{hash_key("k2")}"]
requests_per_minute = 60
tokens_per_day = 1000
""",
    )
    ops, batch = load_tenants(path)
    assert (ops.role, ops.limits.unlimited) == (Role.ADMIN, True)
    assert batch.role == Role.USER
    assert batch.limits == TenantLimits(requests_per_minute=60, tokens_per_day=1000)
    assert len(batch.key_digests) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('[[tenants]]\nname = "a"\nkeys = ["plaintext-key"]', "tenants[0].keys[0]"),
        ('[[tenants]]\nname = "a"\nkeys = []', "tenants[0].keys"),
        ('[[tenants]]\nname = "a b"\nkeys = ["{h}"]', "tenants[0].name"),
        ('[[tenants]]\nname = "a"\nrole = "root"\nkeys = ["{h}"]', "tenants[0].role"),
        (
            '[[tenants]]\nname = "a"\nkeys = ["{h}"]\nrequests_per_minute = 0',
            "tenants[0].requests_per_minute",
        ),
        ('[[tenants]]\nname = "a"\nkeys = ["{h}"]\nrpm = 5', "tenants[0].rpm"),
        (
            '[[tenants]]\nname = "a"\nkeys = ["{h}"]\n[[tenants]]\nname = "a"\nkeys = ["{h2}"]',
            "tenants[1].name",
        ),
        (
            '[[tenants]]\nname = "a"\nkeys = ["{h}"]\n[[tenants]]\nname = "b"\nkeys = ["{h}"]',
            "tenants[1].keys",
        ),
    ],
)
def test_tenants_file_mistakes_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    path = write(tmp_path, body.replace("{h}", hash_key("x")).replace("{h2}", hash_key("y")))
    with pytest.raises(InvalidArgument) as info:
        load_tenants(path)
    assert [v.field for v in info.value.field_violations] == [field]


def test_plaintext_keys_are_refused_without_echoing_them(tmp_path: Path) -> None:
    path = write(tmp_path, '[[tenants]]\nname = "a"\nkeys = ["s3cr3t-value"]')
    with pytest.raises(InvalidArgument) as info:
        load_tenants(path)
    assert "s3cr3t-value" not in info.value.message
    assert "hash-key" in info.value.message


def test_authenticator_maps_bearer_keys_to_tenants() -> None:
    user = Tenant(
        name="u",
        role=Role.USER,
        limits=TenantLimits(),
        key_digests=(bytes.fromhex(hash_key("ku")[7:]),),
    )
    admin = Tenant(
        name="a",
        role=Role.ADMIN,
        limits=TenantLimits(),
        key_digests=(bytes.fromhex(hash_key("ka")[7:]),),
    )
    auth = Authenticator([user, admin], CollectorRegistry())
    assert auth.authenticate([("authorization", "Bearer ku")]) is user
    assert auth.authenticate([("authorization", "bearer  ka ")]) is admin
    for metadata, words in [
        ([], "missing"),
        ([("authorization", "Basic ku")], "malformed"),
        ([("authorization", "Bearer nope")], "invalid"),
    ]:
        with pytest.raises(Unauthenticated, match=words):
            auth.authenticate(metadata)
    auth.require_admin(admin)
    with pytest.raises(PermissionDenied, match="role 'admin'"):
        auth.require_admin(user)
    assert Authenticator(None, CollectorRegistry()).authenticate([]) is ANONYMOUS


def test_a_changed_tenants_file_is_reloaded_and_a_broken_one_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, f'[[tenants]]\nname = "a"\nkeys = ["{hash_key("k")}"]')
    source = TenantsFile(path)
    assert source.reload() is None  # unchanged
    path.write_text(f'[[tenants]]\nname = "b"\nkeys = ["{hash_key("k")}"]')
    os.utime(path, (1, 1))
    reloaded = source.reload()
    assert reloaded is not None and reloaded[0].name == "b"
    path.write_text("[[tenants]\nbroken")
    os.utime(path, (2, 2))
    assert source.reload() is None
    assert source.tenants[0].name == "b"


def test_new_key_prints_the_key_once_to_stderr_and_only_its_hash_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert keys_command(["new-key", "research", "admin"]) == 0
    out, err = capsys.readouterr()
    key = err.strip().rsplit(" ", 1)[-1]
    assert key.startswith("mk-") and key not in out
    (tenant,) = load_tenants(write(tmp_path, out))
    assert (tenant.name, tenant.role) == ("research", Role.ADMIN)
    assert (
        Authenticator([tenant], CollectorRegistry()).authenticate(
            [("authorization", f"Bearer {key}")]
        )
        is tenant
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert keys_command(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(key) == out.split('"')[-2]
    assert keys_command(["new-key", "x", "root"]) == 2


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({}, "tenants_file"),
        ({"auth": "none", "tenants_file": "t.toml"}, "tenants_file"),
        ({"auth": "password"}, "auth"),
        ({"auth": "none", "quota_store": "etcd"}, "quota_store"),
        ({"auth": "none", "quota_store": "redis"}, "redis_url"),  # or redis_url_file
        ({"auth": "none", "redis_unavailable": "maybe"}, "redis_unavailable"),
    ],
)
def test_auth_and_quota_settings_are_validated(settings: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        RouterConfig.from_flat({"replicas": ("a:1",), **settings}).validate()
    assert [v.field for v in info.value.field_violations] == [field]


def test_the_redis_url_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_REDIS_URL", "redis://:pw@redis:6379/0")
    args = parse_args(["--replica", "a:1", "--no-auth", "--quota-store", "redis"])
    config = config_from_args(args)
    assert (config.auth, config.quota.store, config.redis.url) == (
        "none",
        "redis",
        "redis://:pw@redis:6379/0",
    )


URL = "redis://:hunter2@redis:6379/0"


def test_the_redis_url_can_come_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHLLM_REDIS_URL", raising=False)
    path = tmp_path / "url"
    path.write_text(f"  {URL}\n")  # as `kubectl create secret --from-file` may leave it
    args = parse_args(
        ["--replica", "a:1", "--no-auth", "--quota-store", "redis", "--redis-url-file", str(path)]
    )
    config = config_from_args(args)
    assert (config.redis.url_file, config.redis.url) == (str(path), "")
    path.write_text("redis://changed:6379/0")
    assert config.redis.address() == URL  # read once, whitespace stripped


@pytest.mark.parametrize("from_env", [False, True])
def test_redis_url_and_redis_url_file_are_exclusive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_env: bool
) -> None:
    (tmp_path / "url").write_text(URL)
    flags = ["--replica", "a:1", "--no-auth", "--redis-url-file", str(tmp_path / "url")]
    if from_env:
        monkeypatch.setenv("MESHLLM_REDIS_URL", URL)
    else:
        monkeypatch.delenv("MESHLLM_REDIS_URL", raising=False)
        flags += ["--redis-url", URL]
    with pytest.raises(InvalidArgument) as info:
        config_from_args(parse_args(flags))
    (violation,) = info.value.field_violations
    assert violation.field == "redis_url_file" and "set one" in violation.description


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file"),
        ("dir", "Is a directory"),
        ("", "is empty"),
        (" \n\t\n", "is empty"),
        (f"{URL}\xff".encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_a_bad_redis_url_file_is_named_but_never_shown(
    tmp_path: Path, content: str | bytes | None, problem: str
) -> None:
    path = tmp_path / "url"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    config = RouterConfig.from_flat(
        {"replicas": ("a:1",), "auth": "none", "quota_store": "redis", "redis_url_file": str(path)}
    )
    with pytest.raises(InvalidArgument) as info:
        config.validate()
    (violation,) = info.value.field_violations
    assert violation.field == "redis_url_file"
    assert str(path) in violation.description and problem in violation.description
    assert "hunter2" not in str(info.value) and "hunter2" not in violation.description
