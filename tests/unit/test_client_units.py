"""Fast, exact tests of the client's pure parts: retry policy, pacing, abort threshold, and the
batch runner driven by a fake transport and a fake clock (no gRPC, no sleeping)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import random
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshllm.client
from meshllm.api import convert, errors
from meshllm.api import types as api_types
from meshllm.api.errors import MeshError
from meshllm.api.spec import DEFAULT_MAX_TOKENS, ModelSpec
from meshllm.api.types import (
    DeviceMemory,
    ModelPlacement,
    QuotaUsage,
    ReplicaState,
    ReplicaStatus,
    prompt_tokens_estimate,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.client import (
    NO_DEADLINE,
    USE_CLIENT_DEFAULT,
    AbortPolicy,
    AsyncClient,
    BatchOptions,
    Client,
    Completion,
    FinishReason,
    Pacing,
    RequestFields,
    RetryPolicy,
    Timeout,
    Timing,
    Usage,
)
from meshllm.client._abort import FailureTracker
from meshllm.client._admin import overrides_to_pb
from meshllm.client._batch import BatchRunner, Prepared, item_fields, token_estimate
from meshllm.client._cli_admin import overrides, render_placement, render_placements, render_quota
from meshllm.client._convert import build_request, chunk_from_pb, completion_from_pb
from meshllm.client._options import CallTimeout
from meshllm.client._pacing import Limit, Pacer, RateLimits, TokenBucket, parse_rate_limits
from meshllm.client._retry import backoff, is_transient, pauses_everyone, retry_delay
from meshllm.client._types import BatchItem
from meshllm.client.local import CatalogEntry, LocalMesh, LocalMeshConfig, read_catalog

# -- retry policy --------------------------------------------------------------------------------

NO_JITTER = RetryPolicy(jitter=0.0)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (errors.Unavailable("no replica", reason="NO_HEALTHY_REPLICA"), True),
        (errors.Unavailable("cut", reason="STREAM_INTERRUPTED"), True),  # unary: client saw nothing
        (errors.ResourceExhausted("quota", reason="QUOTA_EXCEEDED", retry_after=2.0), True),
        (errors.DeadlineExceeded("late"), True),
        (errors.InvalidArgument("bad"), False),
        (errors.NotFound("which model"), False),
        (errors.PermissionDenied("no"), False),
        (errors.Unauthenticated("who"), False),
        (errors.FailedPrecondition("not loaded"), False),
        (errors.Cancelled("bye"), False),
        (errors.Internal("bug"), False),
    ],
)
def test_which_failures_are_retried(error: MeshError, transient: bool) -> None:
    assert is_transient(error) is transient
    assert (retry_delay(NO_JITTER, error, 1, random.Random(0)) is not None) is transient


def test_nothing_is_retried_once_a_stream_has_shown_tokens() -> None:
    interrupted = errors.Unavailable("cut", reason="STREAM_INTERRUPTED")
    assert not is_transient(interrupted, streamed=True)
    assert retry_delay(NO_JITTER, interrupted, 1, random.Random(0), streamed=True) is None


def test_deadline_retry_can_be_turned_off() -> None:
    policy = RetryPolicy(retry_deadline=False)
    assert retry_delay(policy, errors.DeadlineExceeded("late"), 1, random.Random(0)) is None


def test_backoff_doubles_up_to_its_cap_and_stops_after_max_attempts() -> None:
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=3.0, jitter=0.0, max_attempts=6)
    err = errors.Unavailable("down")
    delays = [retry_delay(policy, err, a, random.Random(0)) for a in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, None]


def test_full_jitter_stays_within_the_backoff() -> None:
    rng = random.Random(1)
    draws = [backoff(RetryPolicy(initial_backoff_s=1.0), 1, rng) for _ in range(200)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert max(draws) - min(draws) > 0.5  # really spread


def test_server_retry_info_is_a_floor_and_a_huge_one_fails_now() -> None:
    err = errors.ResourceExhausted("quota", retry_after=7.5)
    delay = retry_delay(RetryPolicy(max_backoff_s=1.0), err, 1, random.Random(0))
    assert delay is not None and 7.5 <= delay <= 7.5 * 1.1
    daily = errors.ResourceExhausted("tokens per day", retry_after=8 * 3600.0)
    assert retry_delay(RetryPolicy(), daily, 1, random.Random(0)) is None


def test_only_a_shared_refusal_pauses_the_whole_batch() -> None:
    rate = errors.ResourceExhausted(
        "rpm", retry_after=2.0, metadata={"limits": "requests_per_minute"}
    )
    slots = errors.ResourceExhausted(
        "busy", retry_after=1.0, metadata={"limits": "concurrent_requests"}
    )
    assert pauses_everyone(rate) and not pauses_everyone(slots)
    assert pauses_everyone(errors.Unavailable("none", reason="NO_HEALTHY_REPLICA", retry_after=1.0))
    assert not pauses_everyone(errors.Unavailable("gone"))


# -- pacing ----------------------------------------------------------------------------------------


def test_rate_limit_metadata_is_parsed_and_partial_sets_are_ignored() -> None:
    limits = parse_rate_limits(
        [
            ("x-ratelimit-limit-requests", "600"),
            ("x-ratelimit-remaining-requests", "599"),
            ("x-ratelimit-reset-requests", "0.100"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "oops"),
            ("x-ratelimit-reset-tokens", "1.0"),
            ("other", "1"),
        ]
    )
    assert limits == RateLimits(requests=Limit(600.0, 599.0, 0.1), tokens=None)
    assert limits.requests is not None and limits.requests.rate == pytest.approx(10.0)
    assert parse_rate_limits(None) == RateLimits()


def test_explicit_request_rate_allows_one_second_of_burst_then_spreads_requests() -> None:
    pacer = Pacer(Pacing(requests_per_minute=120), now=0.0)
    now, sent = 0.0, []
    for _ in range(5):
        now += pacer.delay(now, 1.0)
        pacer.take(now, 1.0)
        sent.append(now)
    assert sent == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5])


def test_a_request_larger_than_the_token_bucket_waits_for_a_full_one_not_forever() -> None:
    bucket = TokenBucket(capacity=100.0, rate=100.0, now=0.0)
    assert bucket.wait(0.0, 500.0) == 0.0
    bucket.take(0.0, 500.0)  # debt of 400
    assert bucket.wait(0.0, 500.0) == pytest.approx(5.0)  # back to full (100) after 5 s


def test_learned_server_limits_hold_requests_back_until_the_bucket_refills() -> None:
    pacer = Pacer(Pacing(), now=0.0)
    ticket = pacer.take(0.0, 50.0)
    report = RateLimits(requests=Limit(60.0, 0.0, 60.0), tokens=Limit(6000.0, 5950.0, 0.5))
    pacer.observe(0.0, report, ticket)
    assert pacer.delay(0.0, 50.0) == pytest.approx(1.0)  # 60/min: one request a second
    assert pacer.delay(1.0, 50.0) == 0.0


def test_learned_limits_discount_requests_sent_after_the_reported_one() -> None:
    pacer = Pacer(Pacing(), now=0.0)
    first = pacer.take(0.0, 10.0)
    for _ in range(3):
        pacer.take(0.0, 10.0)
    pacer.observe(0.0, RateLimits(requests=Limit(10.0, 5.0, 30.0)), first)
    assert pacer.server_requests is not None and pacer.server_requests.level == 2.0


def test_unused_tokens_come_back_when_a_reply_settles() -> None:
    pacer = Pacer(Pacing(tokens_per_minute=600), now=0.0)  # 10/s, a bucket of 10
    ticket = pacer.take(0.0, 10.0)
    assert pacer.delay(0.0, 10.0) == pytest.approx(1.0)
    pacer.settle(ticket, used_tokens=4.0)
    assert pacer.delay(0.0, 10.0) == pytest.approx(0.4)


def test_following_the_server_can_be_turned_off_and_a_pause_holds_everyone() -> None:
    pacer = Pacer(Pacing(follow_server=False), now=0.0)
    pacer.observe(0.0, RateLimits(requests=Limit(1.0, 0.0, 60.0)), pacer.take(0.0, 1.0))
    assert pacer.delay(0.0, 1.0) == 0.0
    pacer.pause_until(3.0)
    assert pacer.delay(1.0, 1.0) == 2.0


# -- abort threshold -------------------------------------------------------------------------------


def test_consecutive_failures_abort_and_a_success_resets_the_count() -> None:
    tracker = FailureTracker(AbortPolicy(max_consecutive_failures=3))
    assert [tracker.record(ok) for ok in (False, False, True, False, False)] == [None] * 5
    assert tracker.record(False) == "3 items in a row failed"


def test_failure_ratio_aborts_only_after_min_items() -> None:
    tracker = FailureTracker(AbortPolicy(max_failure_ratio=0.5, min_items=10))
    outcomes = [tracker.record(False) for _ in range(9)]
    assert outcomes == [None] * 9
    assert tracker.record(False) is not None


# -- the batch runner, with a fake transport ----------------------------------------------------


def completion(text: str, tokens: int = 3) -> Completion:
    return Completion(
        text=text,
        token_ids=(1,) * tokens,
        request_id="r",
        model="m",
        finish_reason=FinishReason.LENGTH,
        stop_sequence="",
        usage=Usage(prompt_tokens=1, completion_tokens=tokens),
        timing=Timing(
            queue_wait_ms=0,
            time_to_first_token_ms=0,
            decode_ms=0,
            total_ms=0,
            tokens_per_second=0,
            replica="fake",
        ),
    )


Script = Callable[[int, int], MeshError | None]
"""(item index, attempt) -> the error that attempt fails with, or None for success."""


class FakeTransport:
    """Answers by script; each call yields to the loop a number of times that depends on the
    index, so completions come back out of input order."""

    def __init__(self, script: Script | None = None, limits: RateLimits | None = None) -> None:
        self.script, self.limits = script, limits or RateLimits()
        self.calls: list[int] = []
        self.finished: list[int] = []
        self.attempts: dict[int, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.gate: asyncio.Event | None = None

    def prepare(self, fields: dict[str, Any]) -> Prepared:
        if fields["prompt"] == "bad":
            raise TypeError("unknown request fields: bogus")
        return Prepared(fields, None, token_estimate(fields))

    def cached(self, prepared: Prepared) -> Completion | None:
        return None

    def store(self, prepared: Prepared, completion: Completion) -> None:
        pass

    async def send(self, prepared: Prepared, timeout: CallTimeout) -> tuple[Completion, RateLimits]:
        index = int(prepared.request["prompt"])
        attempt = self.attempts[index] = self.attempts.get(index, 0) + 1
        self.calls.append(index)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if index == 0 and self.gate is not None:
                await self.gate.wait()
            for _ in range((index * 7) % 5):
                await asyncio.sleep(0)
            error = self.script(index, attempt) if self.script else None
            self.finished.append(index)
            if error is not None:
                raise error
            return completion(f"out {index}"), self.limits
        finally:
            self.in_flight -= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def runner(transport: FakeTransport, clock: FakeClock | None = None, **options: Any) -> BatchRunner:
    clock = clock or FakeClock()
    return BatchRunner(
        transport, BatchOptions(**options), clock=clock, sleep=clock.sleep, rng=random.Random(0)
    )


async def collect(r: BatchRunner, prompts: Any) -> list[BatchItem]:
    return [item async for item in r.run(prompts, {"model": "m", "max_tokens": 4})]


async def test_results_come_in_input_order_though_they_finish_out_of_order() -> None:
    transport = FakeTransport()
    items = await collect(runner(transport, concurrency=8), [str(i) for i in range(500)])
    assert [i.index for i in items] == list(range(500))
    assert [i.result.text for i in items if i.result] == [f"out {i}" for i in range(500)]
    assert transport.finished != sorted(transport.finished)  # they really did finish out of order


async def test_unordered_yields_every_index_once_in_completion_order() -> None:
    items = await collect(
        runner(FakeTransport(), concurrency=8, ordered=False), (str(i) for i in range(300))
    )
    assert sorted(i.index for i in items) == list(range(300))
    assert [i.index for i in items] != list(range(300))


async def test_the_window_bounds_what_is_read_while_the_first_item_is_stuck() -> None:
    transport = FakeTransport()
    transport.gate = asyncio.Event()
    pulled = 0

    def prompts() -> Iterator[str]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield str(i)

    run = runner(transport, concurrency=4).run(prompts(), {"model": "m"})
    first = asyncio.ensure_future(anext(run))
    for _ in range(200):
        await asyncio.sleep(0)
    assert not first.done()  # item 0 holds the ordered output back ...
    assert pulled == 16  # ... and no more than the window (4 x concurrency) is read meanwhile
    transport.gate.set()
    assert (await first).index == 0
    rest = [item async for item in run]
    assert len(rest) == 9_999 and transport.max_in_flight == 4


async def test_a_failed_item_is_none_with_its_error_and_the_batch_goes_on() -> None:
    def script(index: int, attempt: int) -> MeshError | None:
        return errors.InvalidArgument("too long") if index % 3 == 0 else None

    items = await collect(runner(FakeTransport(script)), [str(i) for i in range(30)] + ["bad"])
    failed = [i for i in items if i.error is not None]
    assert [i.index for i in failed] == [*range(0, 30, 3), 30]
    assert all(i.result is None for i in failed)
    assert isinstance(failed[-1].error, errors.InvalidArgument) and failed[-1].attempts == 0
    assert all(i.attempts == 1 for i in failed[:-1])  # INVALID_ARGUMENT is never retried


async def test_transient_failures_are_retried_with_backoff_and_retry_info() -> None:
    def script(index: int, attempt: int) -> MeshError | None:
        if index == 1 and attempt <= 2:
            return errors.Unavailable("replica gone")
        if index == 2 and attempt == 1:
            return errors.ResourceExhausted("quota", reason="QUOTA_EXCEEDED", retry_after=4.0)
        return None

    clock, transport = FakeClock(), FakeTransport(script)
    items = await collect(runner(transport, clock, concurrency=1, retry=NO_JITTER), ["0", "1", "2"])
    assert [i.attempts for i in items] == [1, 3, 2]
    assert all(i.ok for i in items)
    assert clock.sleeps[:2] == [0.2, 0.4]  # exponential backoff for item 1
    assert 4.0 <= sum(clock.sleeps[2:]) <= 4.4  # item 2 waited the server's refill time


async def test_an_item_that_keeps_failing_ends_with_its_last_error() -> None:
    transport = FakeTransport(lambda index, attempt: errors.Unavailable(f"down {attempt}"))
    (item,) = await collect(runner(transport, retry=RetryPolicy(max_attempts=3)), ["0"])
    assert item.attempts == 3 and item.error is not None and item.error.message == "down 3"


async def test_abort_after_consecutive_failures_ends_the_rest_as_aborted() -> None:
    transport = FakeTransport(lambda index, attempt: errors.PermissionDenied("no"))
    seen: list[tuple[int, bool]] = []
    r = runner(
        transport,
        concurrency=1,
        abort=AbortPolicy(max_consecutive_failures=5),
        on_result=lambda i, res, err: seen.append((i, err is None)),
    )
    items = await collect(r, [str(i) for i in range(100)])
    assert [i.index for i in items] == list(range(100))
    assert len(transport.calls) == 5
    aborted = [i for i in items if isinstance(i.error, errors.Aborted)]
    assert len(aborted) == 95 and aborted[0].index == 5
    assert aborted[0].error is not None and aborted[0].error.reason == "BATCH_ABORTED"
    assert aborted[0].error.code == grpc.StatusCode.ABORTED
    assert sorted(i for i, _ in seen) == list(range(100))  # on_result once per item


async def test_abort_cancels_calls_in_flight_and_never_hangs() -> None:
    stuck = asyncio.Event()  # never set: items 1.. would wait forever

    class Stuck(FakeTransport):
        async def send(
            self, prepared: Prepared, timeout: CallTimeout
        ) -> tuple[Completion, RateLimits]:
            if prepared.request["prompt"] != "0":
                await stuck.wait()
            raise errors.Internal("bug")

    r = runner(Stuck(), concurrency=8, abort=AbortPolicy(max_consecutive_failures=1))
    items = await asyncio.wait_for(collect(r, [str(i) for i in range(50)]), timeout=5)
    assert isinstance(items[0].error, errors.Internal)
    assert all(isinstance(i.error, errors.Aborted) for i in items[1:])


async def test_explicit_pacing_spaces_calls_in_the_runner() -> None:
    clock = FakeClock()
    await collect(
        runner(FakeTransport(), clock, concurrency=1, pacing=Pacing(requests_per_minute=30)),
        ["0", "1", "2", "3"],
    )
    assert sum(clock.sleeps) == pytest.approx(6.0)  # 2 s apart after the first (0.5/s: no burst)


async def test_learned_quota_from_replies_paces_the_next_calls() -> None:
    clock = FakeClock()
    limits = RateLimits(requests=Limit(6.0, 0.0, 60.0))  # every reply: bucket empty, 6/min
    await collect(runner(FakeTransport(limits=limits), clock, concurrency=1), ["0", "1", "2"])
    assert sum(clock.sleeps) == pytest.approx(20.0)  # 10 s between calls


def test_item_fields_and_token_estimate() -> None:
    chat = [{"role": "user", "content": "hi there"}]
    assert item_fields({"messages": chat, "id": 3}, {"max_tokens": 8}) == {
        "prompt": chat,
        "id": 3,
        "max_tokens": 8,
    }
    assert item_fields("text", {"model": "m"}) == {"model": "m", "prompt": "text"}
    assert token_estimate({"prompt": "x" * 9, "max_tokens": 10}) == 13.0
    assert token_estimate({"prompt": chat}) == 3 + 4 + 256
    with pytest.raises(errors.InvalidArgument):
        item_fields(42, {})  # type: ignore[arg-type]


async def test_an_exception_in_on_result_stops_the_batch_and_cancels_the_rest() -> None:
    transport = FakeTransport()

    def on_result(index: int, result: object, error: object) -> None:
        if index == 5:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await collect(
            runner(transport, concurrency=4, on_result=on_result), (str(i) for i in range(10_000))
        )
    assert len(transport.calls) < 100


# -- typed options, one vocabulary ----------------------------------------------------------------

REQUEST_METHODS = ("generate", "stream", "iter_batch", "generate_batch")


@pytest.mark.parametrize("cls", [AsyncClient, Client])
@pytest.mark.parametrize("name", REQUEST_METHODS)
def test_every_request_method_takes_exactly_the_request_fields_as_keywords(
    cls: type, name: str
) -> None:
    """One definition: each method's request keywords are RequestFields' fields, in order,
    with the same annotations and defaults (the rest is model, stream options and timeout or
    batch options)."""
    own = {"model", "timeout", "options", "coalesce_tokens", "coalesce_ms"}
    sig = inspect.signature(getattr(cls, name))
    keywords = [
        (p.name, p.annotation, p.default)
        for p in sig.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in own
    ]
    assert keywords == [(f.name, f.type, f.default) for f in dataclasses.fields(RequestFields)]
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def test_timeout_unset_is_the_clients_default_and_none_is_no_deadline() -> None:
    client = AsyncClient("127.0.0.1:1", timeout=7.5)
    assert client.timeout == Timeout(7.5)
    assert client._deadline(USE_CLIENT_DEFAULT) == 7.5
    assert client._deadline(None) is None and client._deadline(NO_DEADLINE) is None
    assert client._deadline(2) == 2.0 and client._deadline(Timeout(3.0)) == 3.0
    assert AsyncClient("127.0.0.1:1")._deadline(USE_CLIENT_DEFAULT) is None
    assert BatchOptions().timeout is USE_CLIENT_DEFAULT
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="timeout"):
            Timeout(bad)
    with pytest.raises(TypeError, match="timeout"):
        AsyncClient("127.0.0.1:1", timeout="30")  # type: ignore[arg-type]


def test_request_fields_build_the_request_and_an_item_may_override_them() -> None:
    fields = RequestFields(max_tokens=8, temperature=0.0, stop=("\n",), priority=2)
    req = build_request("hi", model="m", fields=fields, coalesce_tokens=4)
    assert (req.prompt, req.max_tokens, req.temperature, list(req.stop), req.priority) == (
        "hi",
        8,
        0.0,
        ["\n"],
        2,
    )
    assert req.stream_options.coalesce_tokens == 4
    assert not req.HasField("top_k") and not req.HasField("seed")
    assert fields.updated({"max_tokens": 2}).max_tokens == 2
    with pytest.raises(TypeError, match="unknown request fields: bogus"):
        fields.updated({"bogus": 1})
    assert fields.given() == {"max_tokens": 8, "temperature": 0.0, "stop": ["\n"], "priority": 2}


def test_the_token_estimate_is_the_routers_and_counts_instructions() -> None:
    chat = [{"role": "user", "content": "hi there"}]
    for prompt, instructions in (("x" * 9, ""), ("x" * 9, "be brief"), (None, "")):
        fields = RequestFields(instructions=instructions or None, max_tokens=10)
        expected = prompt_tokens_estimate(prompt=prompt or "", instructions=instructions) + 10
        assert fields.tokens(prompt) == expected
    assert RequestFields(instructions="x" * 40).tokens(chat) == 10 + 3 + 4 + DEFAULT_MAX_TOKENS
    assert token_estimate({"prompt": "abcd", "instructions": "abcd", "id": 1}) == 2 + 256


def test_completion_rows_keep_total_tokens_and_read_old_rows() -> None:
    done = completion("hi", tokens=3)
    row = done.to_dict()
    assert row["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    assert Completion.from_dict(json.loads(json.dumps(row))) == done
    assert meshllm.client.Usage is api_types.Usage and meshllm.client.Timing is api_types.Timing
    assert meshllm.client.FinishReason is api_types.FinishReason
    assert meshllm.client.ModelInfo is api_types.ModelInfo


def test_replies_convert_through_the_shared_conversions() -> None:
    response = gen.GenerateResponse(
        text="x",
        model="m",
        finish_reason=gen.FINISH_REASON_STOP,
        usage=gen.Usage(prompt_tokens=2, completion_tokens=5, total_tokens=7),
        timing=gen.Timing(total_ms=3.0, replica="r1"),
    )
    done = completion_from_pb(response)
    assert done.finish_reason is FinishReason.STOP and done.usage.total_tokens == 7
    assert done.replica == "r1"
    last = chunk_from_pb(gen.GenerateChunk(text="", finish_reason=gen.FINISH_REASON_LENGTH))
    assert last.finish_reason is FinishReason.LENGTH and last.usage is not None
    assert chunk_from_pb(gen.GenerateChunk(text="a")).usage is None


# -- admin client and CLI, meshllm up -----------------------------------------------------------


def test_set_pairs_become_spec_overrides_and_every_mistake_names_itself() -> None:
    parsed = overrides(["max_batch_size=8", "options.cache_size=8192", "compute_type=int8"])
    assert parsed == {
        "max_batch_size": 8,
        "compute_type": "int8",
        "options": {"cache_size": "8192"},
    }
    spec = overrides_to_pb(parsed)
    assert (spec.max_batch_size, dict(spec.options), spec.compute_type, spec.id) == (
        8,
        {"cache_size": "8192"},
        "int8",
        "",
    )
    for bad in ("max_batch_size=eight", "speed=1", "id=x", "path"):
        with pytest.raises(errors.InvalidArgument, match="--set"):
            overrides([bad])
    for wrong in ({"id": "x"}, {"max_batch_size": "8"}, {"speed": 1}, {"max_queued": -1}):
        with pytest.raises(errors.InvalidArgument, match="overrides"):
            overrides_to_pb(wrong)


def test_admin_replies_render_as_aligned_tables() -> None:
    failed = ReplicaStatus(
        replica_id="replica-10",
        state=ReplicaState.FAILED,
        device="cpu",
        error="no such path",
        spec=ModelSpec(id="demo", path="demo"),
    )
    ok = ReplicaStatus(
        replica_id="r1",
        state=ReplicaState.READY,
        device="cuda:0",
        spec=ModelSpec(id="demo", path="demo"),
        memory=DeviceMemory(
            device="cuda:0", used_bytes=2**30, total_bytes=80 * 2**30, source="nvml"
        ),
    )
    placement = ModelPlacement(
        model="demo",
        configured=True,
        desired_replicas=2,
        max_replicas=0,
        replicas=(failed, ok),
        ready_replicas=1,
        pending="1 of 2 ready",
    )
    lines = render_placement(placement)
    assert lines[0] == "demo: 1 ready (desired 2) - 1 of 2 ready"
    assert lines[1].split() == [
        "replica-10",
        "failed",
        "demo",
        "cpu",
        "0",
        "running",
        "0",
        "queued",
        "0",
        "tok/s",
        "memory",
        "?",
        "error:",
        "no",
        "such",
        "path",
    ]
    assert lines[2].index("ready") == lines[1].index("failed")  # columns line up
    assert "1.00/80.0 GiB (nvml)" in lines[2]
    assert render_placements([]) == ["(no models)"] and render_quota([]) == ["(no limits)"]
    usage = QuotaUsage(tenant="t", limit="tokens_per_minute", used=5, limit_value=10, resets_in_s=3)
    assert render_quota([usage]) == ["t  tokens_per_minute  5/10  resets in 3s"]
    # --json prints the wire form, which converts back to the same placement
    assert convert.placement_from_pb(convert.placement_to_pb(placement)) == placement


def test_meshllm_up_without_a_config_puts_its_model_on_every_replica(tmp_path: Path) -> None:
    mesh = LocalMesh(LocalMeshConfig(replicas=3, model=str(tmp_path / "my-model")))
    path = mesh._router_config()
    assert mesh.catalog == (CatalogEntry(id="my-model", desired_replicas=3),)
    assert tomllib.loads(path.read_text())["models"] == {
        "my-model": {"path": str(tmp_path / "my-model"), "desired_replicas": 3}
    }
    mesh.stop()
    assert not path.exists()


def test_meshllm_up_reads_the_catalog_of_a_router_config(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(
        '[router]\npolicy = "round-robin"\n[models.demo]\npath = "demo"\ndesired_replicas = 2\n'
        '[models.bench]\npath = "bench"\n[models.bench.options]\ncache_size = "8"\n'
    )
    assert read_catalog(config) == (
        CatalogEntry(id="demo", desired_replicas=2),
        CatalogEntry(id="bench", desired_replicas=0),
    )
    config.write_text('[models.demo]\npath = "demo"\ndesired_replicas = "two"\n')
    with pytest.raises(ValueError, match=r"models\.demo\.desired_replicas"):
        read_catalog(config)


async def test_a_reply_the_server_cut_short_is_retried_and_never_counted_a_success() -> None:
    class CutShort(FakeTransport):
        """Item 1's first two answers end ``cancelled`` (a replica drained past its timeout);
        item 2 always ends ``error``."""

        async def send(
            self, prepared: Prepared, timeout: CallTimeout
        ) -> tuple[Completion, RateLimits]:
            whole, limits = await super().send(prepared, timeout)
            index = int(prepared.request["prompt"])
            if (index == 1 and self.attempts[1] <= 2) or index == 2:
                reason = FinishReason.CANCELLED if index == 1 else FinishReason.ERROR
                return dataclasses.replace(whole, finish_reason=reason), limits
            return whole, limits

    transport = CutShort()
    items = await collect(runner(transport, concurrency=4), ["0", "1", "2"])
    assert [i.ok for i in items] == [True, True, False]
    assert items[1].attempts == 3 and items[1].result is not None
    assert items[1].result.finish_reason is FinishReason.LENGTH
    error = items[2].error
    assert isinstance(error, errors.Unavailable) and error.reason == "STREAM_INTERRUPTED"
    assert items[2].attempts == 6  # every attempt of the policy, then the error, not a result
