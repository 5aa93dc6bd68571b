"""A real ``meshllm-replica`` process exports its spans where the standard OTEL_* variables say:
over OTLP/gRPC or OTLP/HTTP (protobuf) to a real receiver, or to the console; with the service's
name and version in the resource."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import StartProcess, wait_serving
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port

Received = list[otlp.ExportTraceServiceRequest]


class GrpcReceiver(otlp_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(
        self, request: otlp.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        self.received.append(request)
        return otlp.ExportTraceServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received: Received = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        GrpcReceiver(received), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", received
    server.stop(0)


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    received: Received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = self.path == "/v1/traces" and "protobuf" in self.headers["Content-Type"]
            if ok:
                received.append(otlp.ExportTraceServiceRequest.FromString(body))
            reply = otlp.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


def one_request(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = gen.GenerateRequest(model="demo", prompt="hi", max_tokens=3, top_k=1)
        reply = gen_grpc.GenerationStub(channel).Generate(request, timeout=30)
    assert reply.usage.completion_tokens == 3


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "no spans arrived"
        time.sleep(0.1)


def spans_by_name(received: Received) -> dict[str, dict[str, Any]]:
    """Each span's attributes (plain values), by span name, with its resource's under
    ``resource``."""
    out: dict[str, dict[str, Any]] = {}
    for request in received:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {
                        a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                        for a in span.attributes
                    }
                    out[span.name] = {**attrs, "resource": resource}
    return out


@pytest.mark.parametrize(
    ("protocol", "receiver"), [("grpc", "grpc_receiver"), ("http/protobuf", "http_receiver")]
)
def test_the_replica_exports_over_the_protocol_asked_for(
    protocol: str,
    receiver: str,
    request: pytest.FixtureRequest,
    replica_process: StartProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, received = request.getfixturevalue(receiver)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export soon after the request
    _, port = replica_process("--model", "demo")
    one_request(port)
    wait_for(lambda: "meshllm.replica/generate" in spans_by_name(received))
    span = spans_by_name(received)["meshllm.replica/generate"]
    assert span["resource"]["service.name"] == "meshllm-replica"
    assert span["resource"]["service.version"] == metadata.version("meshllm-replica")
    assert (span["rpc.system"], span["rpc.method"], span["rpc.grpc.status_code"]) == (
        "grpc",
        "Generate",
        0,
    )
    assert (span["gen_ai.request.model"], span["gen_ai.usage.output_tokens"]) == ("demo", 3)


def test_the_console_exporter_writes_each_span(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "meshllm.replica", "--host", "127.0.0.1", "--port", str(port)]
    env = {"OTEL_TRACES_EXPORTER": "console", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "stdout"
    with out.open("wb") as stdout:
        proc = subprocess.Popen([*cmd, "--model", "demo"], stdout=stdout, env={**os.environ, **env})
        try:
            wait_serving(port, proc)
            one_request(port)
            wait_for(lambda: '"name": "meshllm.replica/generate"' in out.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = out.read_text()
    assert '"rpc.system": "grpc"' in text and '"service.name": "meshllm-replica"' in text
