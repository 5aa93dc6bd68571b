"""The sync stub examples (examples/stubs/python) against a scripted server: grpcio-testing.

``grpc_testing.channel`` hands each call the example code makes to the test, which plays the
server: it reads the metadata and request, sends initial metadata and chunks, and ends the call
with a status and the google.rpc details meshllm's servers attach (built by the servers' own
``MeshError.to_status``). The example code runs in a thread; the test thread is the server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
import grpc_testing
import meshllm_stubs_example as ex
import pytest

from meshllm.api.errors import (
    FieldViolation,
    InvalidArgument,
    MeshError,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from meshllm.api.v1 import generation_pb2 as pb
from meshllm.api.v1 import generation_pb2_grpc as pb_grpc

# [START scripted]
GENERATION = pb.DESCRIPTOR.services_by_name["Generation"]
GENERATE = GENERATION.methods_by_name["Generate"]
GENERATE_STREAM = GENERATION.methods_by_name["GenerateStream"]
REQUEST = pb.GenerateRequest(model="demo", prompt="hello", max_tokens=8)
KEY = "key-of-tenant-batch"
WAIT_S = 10.0
T = TypeVar("T")


def background(work: Callable[[], T]) -> Future[T]:
    """Run ``work`` in a daemon thread: grpc_testing's waits have no timeout, and a test that
    fails must not leave a thread that blocks the interpreter's exit."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


class Scripted:
    """A grpc_testing channel, a stub on it, example code in a thread, the test as the server."""

    def __init__(self) -> None:
        self.channel = grpc_testing.channel([GENERATION], grpc_testing.strict_real_time())
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.sleeps: list[float] = []

    def run(self, example: Callable[..., T], timeout_s: float = 30, **kwargs: Any) -> Future[T]:
        return background(
            lambda: example(self.stub, REQUEST, api_key=KEY, timeout_s=timeout_s, **kwargs)
        )

    def take_stream(self) -> tuple[dict[str, str | bytes], pb.GenerateRequest, Any]:
        """The next GenerateStream call the example made (fails if it made none)."""
        taken = background(lambda: self.channel.take_unary_stream(GENERATE_STREAM))
        metadata, request, rpc = taken.result(WAIT_S)
        return dict(metadata), request, rpc

    def take_generate(self) -> tuple[dict[str, str | bytes], pb.GenerateRequest, Any]:
        """The next Generate call the example made (fails if it made none)."""
        taken = background(lambda: self.channel.take_unary_unary(GENERATE))
        metadata, request, rpc = taken.result(WAIT_S)
        return dict(metadata), request, rpc


@pytest.fixture
def scripted() -> Scripted:
    return Scripted()


def refuse(rpc: Any, error: MeshError, unary: bool = False) -> None:
    """End ``rpc`` the way a meshllm server does: the status with its google.rpc details."""
    status = error.to_status()
    if unary:
        rpc.terminate(pb.GenerateResponse(), status.trailing_metadata, status.code, status.details)
    else:
        rpc.terminate(status.trailing_metadata, status.code, status.details)


# [END scripted]


def chunk(text: str, **fields: Any) -> pb.GenerateChunk:
    return pb.GenerateChunk(text=text, token_ids=[ord(c) for c in text], **fields)


def failure_of(future: Future[Any]) -> ex.CallFailed:
    with pytest.raises(ex.CallFailed) as raised:
        future.result(WAIT_S)
    return raised.value


QUOTA = ResourceExhausted(
    "tenant batch is over requests_per_minute",
    reason="QUOTA_EXCEEDED",
    retry_after=2.5,
    quota_violations=[QuotaViolation("tenant:batch", "requests_per_minute 5 exhausted")],
    metadata={"tenant": "batch", "limits": "requests_per_minute"},
)


def test_stream_sends_the_key_and_returns_text_finish_reason_and_rate_limits(
    scripted: Scripted,
) -> None:
    seen: list[str] = []
    reply = scripted.run(ex.stream, on_text=seen.append)
    metadata, request, rpc = scripted.take_stream()
    assert metadata["authorization"] == f"Bearer {KEY}"
    assert request == REQUEST
    rpc.send_initial_metadata(
        (("x-ratelimit-remaining-requests", "4"), ("x-ratelimit-limit-requests", "5"))
    )
    rpc.send_response(chunk("Hel", model="demo"))
    rpc.send_response(chunk("lo"))
    usage = pb.Usage(prompt_tokens=5, completion_tokens=5, total_tokens=10)
    rpc.send_response(chunk("!", finish_reason=pb.FINISH_REASON_LENGTH, usage=usage))
    rpc.terminate((), grpc.StatusCode.OK, "")
    result = reply.result(WAIT_S)
    assert result == ex.Reply(
        "Hello!",
        "FINISH_REASON_LENGTH",
        5,
        {"x-ratelimit-remaining-requests": "4", "x-ratelimit-limit-requests": "5"},
    )
    assert seen == ["Hel", "lo", "!"]


def test_stream_interrupted_raises_with_the_partial_text_and_errorinfo(scripted: Scripted) -> None:
    consumed = threading.Semaphore(0)

    def on_text(text: str) -> None:
        consumed.release()

    reply = scripted.run(ex.stream, on_text=on_text)
    _, _, rpc = scripted.take_stream()
    rpc.send_initial_metadata(())
    for text in ("Hel", "lo"):
        rpc.send_response(chunk(text))
        # grpc_testing drops chunks not yet read when the call ends: end it once both are read
        assert consumed.acquire(timeout=WAIT_S)
    refuse(
        rpc,
        Unavailable(
            "replica r0 failed after streaming 5 tokens (UNAVAILABLE: gone); the reply is incomplete",
            reason="STREAM_INTERRUPTED",
            metadata={"replica": "r0", "tokens_streamed": "5"},
        ),
    )
    error = failure_of(reply)
    assert error.partial_text == "Hello"
    assert error.failure == ex.Failure(
        code=grpc.StatusCode.UNAVAILABLE,
        message="replica r0 failed after streaming 5 tokens (UNAVAILABLE: gone); the reply is incomplete",
        reason="STREAM_INTERRUPTED",
        error_metadata={"replica": "r0", "tokens_streamed": "5"},
    )


def test_stream_that_ends_ok_without_a_last_chunk_is_not_a_reply(scripted: Scripted) -> None:
    reply = scripted.run(ex.stream, on_text=lambda _: None)
    _, _, rpc = scripted.take_stream()
    rpc.send_initial_metadata(())
    rpc.send_response(chunk("Hel"))
    rpc.terminate((), grpc.StatusCode.OK, "")
    error = failure_of(reply)
    assert error.failure.code == grpc.StatusCode.DATA_LOSS
    assert error.partial_text == "Hel"


# [START scripted_test]
def test_quota_refusal_is_decoded_and_retried_after_its_retryinfo(scripted: Scripted) -> None:
    reply = scripted.run(ex.generate, sleep=scripted.sleeps.append)
    metadata, _, rpc = scripted.take_generate()
    assert metadata["authorization"] == f"Bearer {KEY}"
    refuse(rpc, QUOTA, unary=True)
    _, request, rpc = scripted.take_generate()  # the retry: the same request again
    assert request == REQUEST
    rpc.send_initial_metadata((("x-ratelimit-remaining-tokens", "90"),))
    response = pb.GenerateResponse(
        text="hi there", finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(completion_tokens=2)
    )
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    result = reply.result(WAIT_S)
    assert result == ex.Reply(
        "hi there", "FINISH_REASON_STOP", 2, {"x-ratelimit-remaining-tokens": "90"}
    )
    assert len(scripted.sleeps) == 1 and 2.5 <= scripted.sleeps[0] <= 2.5 * 1.2


# [END scripted_test]


def test_quota_refusals_past_the_attempts_fail_with_every_detail(scripted: Scripted) -> None:
    reply = scripted.run(ex.generate, sleep=scripted.sleeps.append, attempts=3)
    for _ in range(3):
        _, _, rpc = scripted.take_generate()
        refuse(rpc, QUOTA, unary=True)
    failure = failure_of(reply).failure
    assert failure == ex.Failure(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        message="tenant batch is over requests_per_minute",
        reason="QUOTA_EXCEEDED",
        error_metadata={"tenant": "batch", "limits": "requests_per_minute"},
        retry_after_s=2.5,
        quota_violations=(("tenant:batch", "requests_per_minute 5 exhausted"),),
    )
    assert len(scripted.sleeps) == 2


def test_retryinfo_past_the_deadline_fails_at_once(scripted: Scripted) -> None:
    future = scripted.run(ex.generate, timeout_s=1.0, sleep=scripted.sleeps.append)
    _, _, rpc = scripted.take_generate()
    refuse(rpc, QUOTA, unary=True)  # 2.5 s to wait, 1 s left: waiting cannot help
    assert failure_of(future).failure.retry_after_s == 2.5
    assert scripted.sleeps == []


def test_invalid_argument_is_decoded_and_never_retried(scripted: Scripted) -> None:
    reply = scripted.run(ex.generate, sleep=scripted.sleeps.append)
    _, _, rpc = scripted.take_generate()
    violations = [
        FieldViolation("temperature", "must be >= 0, got -1"),
        FieldViolation("max_tokens", "must be at most 256, got 9000"),
    ]
    refuse(rpc, InvalidArgument("bad request", field_violations=violations), unary=True)
    # a retry would be a second call this test never answers: result() would time out
    failure = failure_of(reply).failure
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.field_violations == (
        ("temperature", "must be >= 0, got -1"),
        ("max_tokens", "must be at most 256, got 9000"),
    )
    assert (failure.reason, failure.retry_after_s, failure.quota_violations) == ("", None, ())
    assert scripted.sleeps == []


def test_a_status_without_details_decodes_to_code_and_message(scripted: Scripted) -> None:
    reply = scripted.run(ex.generate, sleep=scripted.sleeps.append)
    _, _, rpc = scripted.take_generate()
    rpc.terminate(pb.GenerateResponse(), (), grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    assert failure_of(reply).failure == ex.Failure(
        grpc.StatusCode.UNAUTHENTICATED, "unknown API key"
    )
    assert scripted.sleeps == []


def test_first_chunks_cancels_the_call_after_enough_chunks(scripted: Scripted) -> None:
    text = scripted.run(ex.first_chunks, chunks=2)
    _, _, rpc = scripted.take_stream()
    rpc.send_initial_metadata(())
    for piece in ("a", "b", "c", "d"):
        rpc.send_response(chunk(piece))
    # rpc.cancelled() returns once the client cancels (and blocks until then)
    cancelled = background(rpc.cancelled)
    assert text.result(WAIT_S) == "ab"
    cancelled.result(WAIT_S)
