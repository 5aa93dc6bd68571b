"""The exllamav3 engine's own logic, on the CPU: no torch, no exllamav3, no GPU.

- pure mapping: settings and options, request -> job parameters, result dict -> event;
- the real generator loop (``GeneratorLoop``) driven by ``ScriptedGenerator``, a test double of
  ExLlamaV3's ``Generator`` with its documented enqueue / iterate / cancel behaviour;
- the whole replica (gRPC, detokenizer, stop strings, cancellation) on that loop;
- a clear FAILED load when the library is missing or the device is the CPU;
- the tiny Llama folder the GPU tests load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import StartReplica, collect, stub
from safetensors.numpy import load_file

from meshllm.api.errors import FailedPrecondition, InvalidArgument
from meshllm.api.spec import ModelSpec
from meshllm.api.types import FinishReason
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.replica.engines import EngineSettings, create_engine, registry
from meshllm.replica.engines.exllamav3_jobs import (
    PAGE_SIZE,
    JobSpec,
    cache_utilization,
    job_spec,
    parse_options,
    read_result,
    token_list,
)
from meshllm.replica.engines.exllamav3_loop import GeneratorLoop
from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.models.byte_tokenizer import (
    EOS_TOKEN,
    SPECIALS,
    byte_token_id,
    special_token_id,
    vocabulary,
)
from meshllm.replica.models.tiny_llama import (
    TINY_LLAMA,
    TinyLlamaRecipe,
    ensure_ct2_twin,
    ensure_tiny_llama,
    llama_weights,
    token_bias,
    write_tiny_llama,
)
from meshllm.replica.tokenizer import ModelTokenizer
from meshllm.replica.types import SamplingParams

EOS = special_token_id(EOS_TOKEN)
BYTES_END = len(vocabulary())  # byte tokens are ids len(SPECIALS) .. BYTES_END - 1
EXLLAMAV3_INSTALLED = importlib.util.find_spec("exllamav3") is not None


# -- the test double ----------------------------------------------------------------------------


class Ids:
    """Stands in for the (1, n) torch tensors of ExLlamaV3's result dicts."""

    def __init__(self, ids: list[int]) -> None:
        self._ids = ids

    def tolist(self) -> list[list[int]]:
        return [list(self._ids)]


@dataclass(eq=False)
class _Job:
    spec: JobSpec
    serial: int
    new_tokens: int = 0
    text: str = ""


@dataclass(eq=False)
class ScriptedGenerator:
    """A test double of ExLlamaV3's ``Generator`` (never used outside tests).

    Each job "generates" its prompt's ids over and over (an echo, like the fake engine), one per
    ``iterate()``. As ExLlamaV3 documents: a job starts when the cache has pages for its prompt
    plus ``max_new_tokens`` (``started`` result); it ends with ``eos=True`` on a stop token (kept
    out of ``token_ids``, returned under ``held``), on a completed stop string, or at
    ``max_new_tokens``; ``cancel`` drops a pending or running job and frees its pages; a job
    that could never fit is refused by ``enqueue``. ``permits`` (when set) makes each
    ``iterate()`` wait for one release, so a test can hold the loop between steps.
    """

    total_pages: int = 64
    max_batch: int = 256
    decode: Callable[[list[int]], str] = lambda ids: "".join(chr(97 + t % 26) for t in ids)
    step_s: float = 0.0
    fail_at_step: int | None = None
    permits: threading.Semaphore | None = None
    pending: list[_Job] = field(default_factory=list)
    active: list[_Job] = field(default_factory=list)
    enqueued: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    steps: int = 0

    def enqueue(self, job: JobSpec) -> int:
        if self._pages(job) > self.total_pages:
            raise AssertionError(f"Job requires {self._pages(job)} pages (only {self.total_pages})")
        self.pending.append(_Job(job, len(self.enqueued)))
        self.enqueued.append(job.identifier)
        return len(self.enqueued) - 1

    def cancel(self, job: JobSpec) -> None:
        for jobs in (self.pending, self.active):
            for j in [j for j in jobs if j.spec is job]:
                jobs.remove(j)
                self.cancelled.append(job.identifier)

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def pages(self) -> tuple[int, int]:
        return sum(self._pages(j.spec) for j in self.active), self.total_pages

    def open(self) -> None:
        """Stop holding steps."""
        permits, self.permits = self.permits, None
        if permits is not None:
            permits.release(1000)

    def iterate(self) -> list[dict[str, Any]]:
        if self.permits is not None and not self.permits.acquire(timeout=10):
            raise TimeoutError("test did not release a step")
        time.sleep(self.step_s)
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        results = [self._start(j) for j in self._startable()]
        for job in list(self.active):
            results.append(self._next(job))
        return results

    def _startable(self) -> Iterator[_Job]:
        while self.pending and len(self.active) < self.max_batch:
            used = self.pages()[0]
            if used + self._pages(self.pending[0].spec) > self.total_pages:
                return
            job = self.pending.pop(0)
            self.active.append(job)
            yield job

    def _start(self, job: _Job) -> dict[str, Any]:
        return {
            "job": job,
            "stage": "started",
            "eos": False,
            "serial": job.serial,
            "identifier": job.spec.identifier,
        }

    def _next(self, job: _Job) -> dict[str, Any]:
        source = [t for t in job.spec.input_ids if t != special_token_id("<s>")] or [0]
        token = source[job.new_tokens % len(source)]
        job.new_tokens += 1
        r: dict[str, Any] = {
            "job": job,
            "stage": "streaming",
            "eos": False,
            "serial": job.serial,
            "identifier": job.spec.identifier,
        }
        if token in job.spec.stop_conditions:
            return self._end(job, r, "stop_token", held=(token,))
        piece = self.decode([token])
        job.text += piece
        r |= {"token_ids": Ids([token]), "text": piece}
        for s in (s for s in job.spec.stop_conditions if isinstance(s, str)):
            if s in job.text:
                return self._end(job, r | {"eos_triggering_string": s}, "stop_string")
        if job.new_tokens >= job.spec.max_new_tokens:
            return self._end(job, r, "max_new_tokens")
        return r

    def _end(
        self, job: _Job, r: dict[str, Any], reason: str, held: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        self.active.remove(job)
        r |= {
            "eos": True,
            "eos_reason": reason,
            "new_tokens": job.new_tokens,
            "prompt_tokens": len(job.spec.input_ids),
            "full_completion": job.text,
        }
        if held:
            r["held"] = {"token_ids": Ids(list(held))}
        return r

    @staticmethod
    def _pages(job: JobSpec) -> int:
        return -(-(len(job.input_ids) + job.max_new_tokens) // PAGE_SIZE)


class ClosingLoop(GeneratorLoop):
    """The loop with its release hook counted."""

    released = 0

    def release(self) -> None:
        self.released += 1


def make_loop(generator: ScriptedGenerator, *, max_jobs: int = 8) -> ClosingLoop:
    settings = EngineSettings(model_dir=Path("."), eos_ids=frozenset({EOS}))
    return ClosingLoop(
        settings, generator, lambda spec: spec, max_jobs=max_jobs, cache_pages=generator.pages
    )


async def drain(stream: TokenStream, timeout_s: float = 10.0) -> list[int]:
    out: list[int] = []

    async def read_all() -> None:
        while ids := await stream.read():
            out.extend(ids)

    await asyncio.wait_for(read_all(), timeout_s)
    return out


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


# -- pure mapping -------------------------------------------------------------------------------


def test_job_spec_carries_sampling_limits_seed_and_stop_conditions() -> None:
    sampling = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.2,
        max_tokens=33,
        stop=("END", "", "END", "\n\n"),
        seed=7,
    )
    spec = job_spec(5, (0, 10, 11), sampling, {9, 1})
    assert spec.identifier == 5
    assert spec.input_ids == (0, 10, 11)
    assert spec.max_new_tokens == 33
    assert spec.seed == 7
    assert spec.stop_conditions == ("END", "\n\n", 1, 9)  # strings once, empty dropped; EOS ids
    s = spec.sampler
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.7, 40, 0.9, 1.2)


@pytest.mark.parametrize(
    "sampling", [greedy(4, top_k=50, top_p=0.5), SamplingParams(top_k=1, temperature=0.8)]
)
def test_greedy_requests_get_an_argmax_sampler_that_keeps_the_repetition_penalty(
    sampling: SamplingParams,
) -> None:
    spec = job_spec(0, (10,), dataclasses.replace(sampling, repetition_penalty=1.3), ())
    assert (spec.sampler.temperature, spec.sampler.top_k, spec.sampler.top_p) == (0.0, 0, 1.0)
    assert spec.sampler.repetition_penalty == 1.3
    assert spec.seed is None


def test_streaming_result_maps_tensor_ids_and_text() -> None:
    event = read_result(
        {
            "stage": "streaming",
            "eos": False,
            "identifier": 3,
            "token_ids": Ids([5, 6]),
            "text": "ab",
        }
    )
    assert (event.identifier, event.token_ids, event.text) == (3, (5, 6), "ab")
    assert event.finish_reason is None and not event.finished


@pytest.mark.parametrize("stage", ["started", "prefill"])
def test_started_and_prefill_results_carry_no_tokens(stage: str) -> None:
    event = read_result({"stage": stage, "eos": False, "identifier": 1, "curr_progress": 3})
    assert event.stage == stage and event.token_ids == () and not event.finished


def test_stop_token_end_returns_the_held_ids_after_the_emitted_ones() -> None:
    event = read_result(
        {
            "stage": "streaming",
            "eos": True,
            "eos_reason": "stop_token",
            "eos_triggering_token_id": EOS,
            "identifier": 2,
            "new_tokens": 9,
            "prompt_tokens": 4,
            "held": {"text": "ab", "token_ids": Ids([7, 8, EOS])},
        }
    )
    assert event.token_ids == (7, 8, EOS)
    assert event.finish_reason is FinishReason.STOP and event.eos_reason == "stop_token"
    assert (event.prompt_tokens, event.completion_tokens) == (4, 9)


def test_stop_string_end_is_a_stop_and_names_the_string() -> None:
    event = read_result(
        {
            "stage": "streaming",
            "eos": True,
            "eos_reason": "stop_string",
            "eos_triggering_string": "END",
            "token_ids": Ids([3, 4]),
            "text": "x",
            "held": {"text": "END"},
        }
    )
    assert event.finish_reason is FinishReason.STOP
    assert (event.stop_string, event.token_ids) == ("END", (3, 4))


@pytest.mark.parametrize(
    ("eos_reason", "expected"),
    [
        ("max_new_tokens", FinishReason.LENGTH),
        ("end_filter", FinishReason.STOP),
        ("loop_detected", FinishReason.STOP),
    ],
)
def test_end_reasons_map_to_finish_reasons(eos_reason: str, expected: FinishReason) -> None:
    event = read_result(
        {"stage": "streaming", "eos": True, "eos_reason": eos_reason, "token_ids": Ids([1])}
    )
    assert event.finish_reason is expected and event.finished


def test_token_list_flattens_tensors_lists_and_nothing() -> None:
    assert token_list(Ids([1, 2])) == (1, 2)
    assert token_list([[1], [2, 3]]) == (1, 2, 3)
    assert token_list(None) == ()
    assert token_list(np.array([[4, 5]])) == (4, 5)
    with pytest.raises(TypeError):
        token_list("12")


def test_cache_utilization_is_the_share_of_pages_held() -> None:
    assert cache_utilization(8, 32) == 0.25
    assert cache_utilization(0, 32) == 0.0
    assert cache_utilization(40, 32) == 1.0
    assert cache_utilization(3, 0) == 0.0


def settings(**kw: Any) -> EngineSettings:
    return EngineSettings(**{"model_dir": Path("."), "device": "cuda:0", **kw})


def test_options_default_to_an_fp16_cache_of_at_least_the_context() -> None:
    opts = parse_options(settings(device="cuda:1", context_length=2048))
    assert (opts.device_index, opts.cache_tokens, opts.cache_bits) == (1, 8192, None)
    assert (opts.max_chunk_size, opts.max_jobs) == (2048, 32)
    big = parse_options(settings(context_length=20_000, max_batch_size=4))
    assert big.cache_tokens == 20_224  # rounded up to whole pages of 256
    assert big.max_jobs == 4


@pytest.mark.parametrize(
    ("value", "bits"), [("4", (4, 4)), ("4,6", (4, 6)), (" 8 , 2 ", (8, 2)), ("", None)]
)
def test_cache_quant_option_gives_key_and_value_bits(
    value: str, bits: tuple[int, int] | None
) -> None:
    options = {"cache_quant": value, "cache_size": "4096", "max_chunk_size": "512"}
    opts = parse_options(settings(options=options))
    assert (opts.cache_bits, opts.cache_tokens, opts.max_chunk_size) == (bits, 4096, 512)


@pytest.mark.parametrize(
    ("kw", "field_name"),
    [
        ({"options": {"cache_quant": "1"}}, "options.cache_quant"),
        ({"options": {"cache_quant": "4,4,4"}}, "options.cache_quant"),
        ({"options": {"cache_quant": "q4"}}, "options.cache_quant"),
        ({"options": {"cache_size": "1000"}}, "options.cache_size"),
        ({"options": {"cache_size": "big"}}, "options.cache_size"),
        ({"options": {"cache_size": "4096"}, "context_length": 8192}, "options.cache_size"),
        ({"options": {"max_chunk_size": "0"}}, "options.max_chunk_size"),
        ({"options": {"token_delay_ms": "1"}}, "options.token_delay_ms"),
        ({"compute_type": "int8"}, "compute_type"),
    ],
)
def test_bad_options_are_invalid_argument_naming_the_field(
    kw: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_options(settings(**kw))
    assert [v.field for v in e.value.field_violations] == [field_name]
    assert field_name in e.value.message


def test_cpu_device_is_a_failed_precondition_before_any_import() -> None:
    for name in ("cpu", "cuda:x"):
        with pytest.raises(FailedPrecondition) as e:
            create_engine("exllamav3", settings(device=name))
        assert e.value.reason == "DEVICE_UNSUPPORTED" and "CUDA" in e.value.message


@pytest.mark.skipif(EXLLAMAV3_INSTALLED, reason="exllamav3 is installed here")
def test_missing_library_is_a_failed_precondition_with_the_install_command() -> None:
    with pytest.raises(FailedPrecondition) as e:
        create_engine("exllamav3", settings())
    assert e.value.reason == "ENGINE_NOT_INSTALLED"
    assert "pip install 'meshllm-replica[exllamav3]'" in e.value.message


def test_bad_options_are_reported_even_where_the_library_is_missing() -> None:
    with pytest.raises(InvalidArgument, match=r"options\.cache_quant"):
        create_engine("exllamav3", settings(options={"cache_quant": "16"}))


# -- the loop on the test double ----------------------------------------------------------------


async def test_concurrent_requests_stream_their_tokens_and_end_at_max_tokens() -> None:
    double = ScriptedGenerator()
    engine = make_loop(double)
    await engine.start()
    try:
        prompts = [tuple(range(10 + i, 14 + i)) for i in range(6)]
        streams = [engine.submit(p, greedy(9), 0) for p in prompts]
        outputs = await asyncio.gather(*[drain(s) for s in streams])
    finally:
        await engine.close()
    for prompt, out, stream in zip(prompts, outputs, streams, strict=True):
        assert out == [prompt[i % 4] for i in range(9)]
        assert stream.finish_reason is FinishReason.LENGTH and stream.generated == 9
        assert stream.started is not None and stream.first_token is not None
    assert sorted(double.enqueued) == list(range(6))
    assert double.cancelled == []  # every job ended inside the generator
    assert engine.released == 1


async def test_end_of_sequence_stops_the_stream_without_the_eos_token() -> None:
    double = ScriptedGenerator()
    engine = make_loop(double)
    await engine.start()
    try:
        stream = engine.submit((20, 21, EOS, 22), greedy(50), 0)
        out = await drain(stream)
    finally:
        await engine.close()
    assert out == [20, 21]
    assert stream.finish_reason is FinishReason.STOP and stream.generated == 2
    assert double.cancelled == []


async def test_stop_string_ends_the_job_in_the_generator() -> None:
    double = ScriptedGenerator()
    engine = make_loop(double)
    await engine.start()
    try:
        # the double decodes id t as chr(97 + t % 26): 3 -> "d", 4 -> "e", 5 -> "f"
        stream = engine.submit((3, 4, 5), greedy(50, stop=("fd",)), 0)
        out = await drain(stream)
    finally:
        await engine.close()
    assert out == [3, 4, 5, 3]  # the stop string's ids reach the replica, which cuts the text
    assert stream.finish_reason is FinishReason.STOP
    assert double.cancelled == []


async def test_cancelled_request_is_cancelled_in_the_generator_and_others_go_on() -> None:
    double = ScriptedGenerator(step_s=0.002)
    engine = make_loop(double)
    await engine.start()
    try:
        doomed = engine.submit((30, 31), greedy(5000), 0)
        other = engine.submit((40, 41), greedy(60), 0)
        got = await doomed.read(3, 5.0)
        doomed.cancel()
        rest = await drain(doomed)
        other_out = await drain(other)
        await until(lambda: engine.stats().running == 0)
    finally:
        await engine.close()
    assert doomed.finish_reason is FinishReason.CANCELLED
    assert len(got) + len(rest) < 100  # stopped within a few steps, not at 5000
    assert double.cancelled == [0]
    assert len(other_out) == 60 and other.finish_reason is FinishReason.LENGTH


async def test_cache_use_drops_to_zero_when_the_last_job_is_cancelled() -> None:
    double = ScriptedGenerator(step_s=0.002)
    engine = make_loop(double)
    await engine.start()
    try:
        stream = engine.submit((10, 11), greedy(5000), 0)
        await stream.read(2, 5.0)
        assert engine.stats().cache_utilization == 20 / 64  # 5002 tokens: 20 pages of 256
        stream.cancel()
        await until(lambda: engine.stats().running == 0 and engine.stats().cache_utilization == 0)
    finally:
        await engine.close()
    assert double.cancelled == [0]


async def test_unreadable_cache_use_is_reported_as_none_and_serving_goes_on() -> None:
    double = ScriptedGenerator()
    settings = EngineSettings(model_dir=Path("."), eos_ids=frozenset({EOS}))

    def broken() -> tuple[int, int]:
        raise AttributeError("'Generator' object has no attribute 'pagetable'")

    engine = GeneratorLoop(settings, double, lambda spec: spec, max_jobs=4, cache_pages=broken)
    await engine.start()
    try:
        out = await drain(engine.submit((10, 11), greedy(4), 0))
        stats = engine.stats()
    finally:
        await engine.close()
    assert out == [10, 11, 10, 11]
    assert stats.cache_utilization == 0.0 and stats.extra["cache_pages_total"] == 0.0


async def test_waiting_requests_enter_the_generator_by_priority() -> None:
    double = ScriptedGenerator(permits=threading.Semaphore(0))
    engine = make_loop(double, max_jobs=1)
    await engine.start()
    try:
        first = engine.submit((10, 11), greedy(3), 0)
        await until(lambda: double.enqueued == [0])  # the loop is now held inside iterate()
        low = engine.submit((12, 13), greedy(3), 0)
        urgent = engine.submit((14, 15), greedy(3), 5)
        dropped = engine.submit((16, 17), greedy(3), 9)
        dropped.cancel()
        double.open()
        for stream in (first, low, urgent):
            await drain(stream)
        await drain(dropped)
    finally:
        await engine.close()
    assert double.enqueued == [0, 2, 1]  # urgent overtook low; the cancelled one never entered
    assert dropped.finish_reason is FinishReason.CANCELLED


async def test_stats_count_waiting_running_tokens_and_cache_pages() -> None:
    permits = threading.Semaphore(0)
    double = ScriptedGenerator(permits=permits, total_pages=8)
    engine = make_loop(double, max_jobs=2)
    await engine.start()
    try:
        streams = [
            engine.submit((10 + i, 20 + i), greedy(300), 0) for i in range(3)
        ]  # 2 pages each
        await until(lambda: len(double.enqueued) == 2)
        before = engine.stats()
        assert (before.queued, before.running, before.tokens_in_flight) == (3, 0, 900)
        permits.release(1)  # one step: the two jobs start and make a token each
        await until(lambda: engine.stats().cache_utilization > 0)
        during = engine.stats()
        assert (during.queued, during.running, during.tokens_in_flight) == (1, 2, 898)
        assert during.cache_utilization == 0.5  # 4 of 8 pages
        assert during.extra == {"cache_pages_used": 4.0, "cache_pages_total": 8.0}
        double.open()
        await asyncio.gather(*[drain(s) for s in streams])
        # the generator thread frees a finished job's pages just after its last token is out
        await until(lambda: engine.stats().queued + engine.stats().running == 0)
        await until(lambda: engine.stats().cache_utilization == 0.0)
        after = engine.stats()
    finally:
        await engine.close()
    assert (after.tokens_in_flight, after.cache_utilization) == (0, 0.0)


async def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving() -> None:
    double = ScriptedGenerator(fail_at_step=3)
    engine = make_loop(double)
    await engine.start()
    try:
        hit = [engine.submit((50 + i, 60), greedy(100), 0) for i in range(2)]
        for stream in hit:
            await drain(stream)
        later = engine.submit((70, 71), greedy(5), 0)
        later_out = await drain(later)
    finally:
        await engine.close()
    for stream in hit:
        assert stream.finish_reason is FinishReason.ERROR
        assert isinstance(stream.error, RuntimeError) and "illegal memory" in str(stream.error)
    assert sorted(double.cancelled) == [0, 1]  # their jobs were dropped from the generator
    assert later_out == [70, 71, 70, 71, 70] and later.finish_reason is FinishReason.LENGTH


async def test_a_job_the_cache_cannot_hold_fails_alone() -> None:
    double = ScriptedGenerator(total_pages=2)
    engine = make_loop(double)
    await engine.start()
    try:
        too_big = engine.submit((10, 11), greedy(3 * PAGE_SIZE), 0)
        fine = engine.submit((13, 14), greedy(4), 0)
        assert await drain(too_big) == []
        fine_out = await drain(fine)
    finally:
        await engine.close()
    assert too_big.finish_reason is FinishReason.ERROR and "pages" in str(too_big.error)
    assert fine_out == [13, 14, 13, 14]


async def test_close_cancels_running_and_waiting_work_and_frees_the_model() -> None:
    double = ScriptedGenerator(step_s=0.002)
    engine = make_loop(double, max_jobs=1)
    await engine.start()
    running = engine.submit((10, 11), greedy(5000), 0)
    waiting = engine.submit((12, 13), greedy(5), 0)
    await running.read(2, 5.0)
    await engine.close()
    await engine.close()  # idempotent
    assert running.finish_reason is FinishReason.CANCELLED
    assert waiting.finish_reason is FinishReason.CANCELLED
    assert double.cancelled == [0] and double.enqueued == [0]
    assert engine.released == 1
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit((10,), greedy(1), 0)


# -- the whole replica on the loop --------------------------------------------------------------


@pytest.fixture
def scripted_exllamav3(monkeypatch: pytest.MonkeyPatch) -> list[ScriptedGenerator]:
    """Serve engine ``exllamav3`` with the real loop on a ScriptedGenerator that decodes with the
    model folder's tokenizer; the doubles made are listed for the test."""
    made: list[ScriptedGenerator] = []

    def factory(settings: EngineSettings) -> GeneratorLoop:
        tokenizer = ModelTokenizer(settings.model_dir)
        double = ScriptedGenerator(decode=tokenizer.decode, step_s=0.001)
        made.append(double)
        return GeneratorLoop(
            settings, double, lambda spec: spec, max_jobs=4, cache_pages=double.pages
        )

    monkeypatch.setitem(registry._REGISTRY, "exllamav3", factory)
    return made


async def test_replica_streams_stops_and_cancels_through_the_loop(
    start_replica: StartReplica, tiny_llama_dir: Path, scripted_exllamav3: list[ScriptedGenerator]
) -> None:
    spec = ModelSpec(id="llama", path=str(tiny_llama_dir), engine="exllamav3")
    server = await start_replica(
        spec, engine_process=False
    )  # the scripted library is this process's
    channel, client = stub(server.port)
    async with channel:
        chunks = await collect(
            client.GenerateStream(
                gen.GenerateRequest(
                    model="llama", prompt="hello world. ", max_tokens=40, stop=["world. h"]
                )
            )
        )
        long = await collect(
            client.GenerateStream(gen.GenerateRequest(model="llama", prompt="abc", max_tokens=7))
        )
        call = client.GenerateStream(
            gen.GenerateRequest(model="llama", prompt="xyz", max_tokens=2000)
        )
        async for _ in call:
            break
        call.cancel()
        cancelled = await call.code()
        double = scripted_exllamav3[0]
        await until(lambda: double.num_remaining_jobs() == 0)
    last = chunks[-1]
    assert "".join(c.text for c in chunks) == "hello "  # echoed, cut before the stop string
    assert last.finish_reason == gen.FINISH_REASON_STOP and last.stop_sequence == "world. h"
    assert "".join(c.text for c in long) == "abcabca"
    assert long[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert long[-1].usage.completion_tokens == 7
    assert cancelled == grpc.StatusCode.CANCELLED
    assert double.cancelled == [2]  # the third job, freed when its client went away


@pytest.mark.skipif(EXLLAMAV3_INSTALLED, reason="exllamav3 is installed here")
async def test_replica_reports_a_failed_load_when_exllamav3_is_missing(
    start_replica: StartReplica, tiny_llama_dir: Path
) -> None:
    spec = rc.ModelSpec(id="llama", path=str(tiny_llama_dir), engine="exllamav3")
    for device, expected in [
        ("cuda:0", "pip install 'meshllm-replica[exllamav3]'"),
        ("cpu", "needs a CUDA device"),
    ]:
        server = await start_replica(None, device=device)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            control = rc_grpc.ReplicaControlStub(channel)
            status = await control.LoadModel(rc.LoadModelRequest(spec=spec, wait=True))
        assert status.state == rc.REPLICA_STATE_FAILED
        assert expected in status.error


# -- the tiny Llama folder ----------------------------------------------------------------------


def test_tiny_llama_folder_has_the_hugging_face_llama_layout(tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    assert all(n % 128 == 0 for n in (h, inter, v))
    assert config["head_dim"] == h // config["num_attention_heads"] == 128
    assert config["hidden_act"] == "silu" and config["torch_dtype"] == "float16"
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    kv = config["num_key_value_heads"] * config["head_dim"]
    expected = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
        }
    assert {name: t.shape for name, t in tensors.items()} == expected
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    assert all(np.isfinite(t).all() for t in tensors.values())
    tokenizer = ModelTokenizer(tiny_llama_dir)
    assert tokenizer.vocab_size == v
    assert tokenizer.eos_ids == {config["eos_token_id"]}
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"


def test_tiny_llama_is_written_byte_for_byte_the_same(tmp_path: Path) -> None:
    recipe = TinyLlamaRecipe(num_layers=1, seed=99)
    write_tiny_llama(recipe, tmp_path / "a")
    write_tiny_llama(recipe, tmp_path / "b")
    write_tiny_llama(TinyLlamaRecipe(num_layers=1, seed=100), tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    weights = "model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() != (tmp_path / "c" / weights).read_bytes()


def test_tiny_llama_weights_steer_towards_letters_and_away_from_specials() -> None:
    w = llama_weights(TINY_LLAMA)
    assert (w["model.embed_tokens.weight"][:, 0] == 4.0).all()  # the constant bias channel
    for i in range(TINY_LLAMA.num_layers):  # no layer writes into it
        assert not w[f"model.layers.{i}.self_attn.o_proj.weight"][0].any()
        assert not w[f"model.layers.{i}.mlp.down_proj.weight"][0].any()
    bias = token_bias(TINY_LLAMA.vocab_size)
    np.testing.assert_allclose(w["lm_head.weight"][:, 0] * 4.0, bias, rtol=1e-3)
    assert bias[EOS] == bias[-1] == -30.0  # end-of-sequence and reserved tokens far down
    assert bias[byte_token_id(ord("e"))] > 0 > bias[byte_token_id(ord("#"))]


def test_ensure_tiny_llama_builds_once(tmp_path: Path) -> None:
    first = ensure_tiny_llama(TinyLlamaRecipe(num_layers=1), cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_llama(TinyLlamaRecipe(num_layers=1), cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folder left


def test_ctranslate2_twin_runs_the_same_llama_and_never_emits_specials(tmp_path: Path) -> None:
    """CTranslate2 as an independent Llama implementation: the weights load as a Llama, and
    the output head keeps generation on byte tokens (end-of-sequence included never wins)."""
    import ctranslate2

    folder = ensure_ct2_twin(TINY_LLAMA, cache_dir=tmp_path)
    tokenizer = ModelTokenizer(folder)
    generator = ctranslate2.Generator(str(folder), compute_type="float32")
    try:
        for prompt in ("hello world", "gpu request 3: ", "x"):
            tokens = tokenizer.tokens(tokenizer.encode(prompt))
            for topk in (1, 20):
                (result,) = generator.generate_batch(
                    [tokens], max_length=200, sampling_topk=topk, include_prompt_in_result=False
                )
                ids = result.sequences_ids[0]
                assert len(ids) == 200 and all(len(SPECIALS) <= t < BYTES_END for t in ids), ids
    finally:
        generator.unload_model()
