"""The wire contract and packaging: fresh generated code, pinned names, clean namespaces."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

from meshllm.api.v1 import admin_pb2, generation_pb2, replica_control_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_pinned_names_exist() -> None:
    req = generation_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    for name in (
        "model",
        "prompt",
        "messages",
        "token_ids",
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "stop",
        "seed",
        "request_id",
        "priority",
        "stream_options",
    ):
        assert name in req, name
    chunk = generation_pb2.GenerateChunk.DESCRIPTOR.fields_by_name
    assert {"text", "token_ids", "finish_reason", "usage", "timing"} <= set(chunk)
    services = {
        generation_pb2.DESCRIPTOR.services_by_name["Generation"]: {
            "Generate",
            "GenerateStream",
            "ListModels",
        },
        replica_control_pb2.DESCRIPTOR.services_by_name["ReplicaControl"]: {
            "LoadModel",
            "UnloadModel",
            "GetStatus",
            "WatchLoad",
        },
        admin_pb2.DESCRIPTOR.services_by_name["Admin"]: {
            "ListModels",
            "LoadModel",
            "UnloadModel",
            "ScaleModel",
            "DrainReplica",
            "UndrainReplica",
        },
    }
    for service, methods in services.items():
        assert service.full_name.startswith("meshllm.api.v1.")
        assert methods <= set(service.methods_by_name)


def test_no_top_level_router_client_or_replica_packages() -> None:
    for name in ("router", "client", "replica"):
        assert importlib.util.find_spec(name) is None, f"top-level package {name!r} is installed"


def test_client_does_not_pull_in_engines() -> None:
    heavy = {"ctranslate2", "torch", "exllamav3"}
    seen, todo = set(), ["meshllm-client"]
    while todo:
        dist = todo.pop()
        seen.add(dist)
        for line in requires(dist) or []:
            if "extra ==" in line:
                continue
            name = re.split(r"[ <>=!;\[]", line, maxsplit=1)[0].lower()
            assert name not in heavy, f"{dist} requires {name}"
            if name.startswith("meshllm") and name not in seen:
                todo.append(name)
    assert "meshllm-api" in seen


def test_client_imports_without_engines() -> None:
    code = "import sys, meshllm.client; assert not {'ctranslate2', 'torch', 'tokenizers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_client_api_is_pinned() -> None:
    import meshllm.client

    assert {
        "AsyncClient",
        "Client",
        "Completion",
        "StreamChunk",
        "MeshError",
        "ResourceExhausted",
        "Aborted",
        "BatchItem",
        "RetryPolicy",
        "Pacing",
        "AbortPolicy",
        "ResponseCache",
        "ChannelTLS",
    } <= set(meshllm.client.__all__)
    for method in ("generate", "stream", "list_models", "iter_batch", "generate_batch"):
        assert callable(getattr(meshllm.client.Client, method))
        assert callable(getattr(meshllm.client.AsyncClient, method))


STUB_OPTIONS = {
    "go_package": "github.com/meshllm/meshllm/gen/go/meshllm/api/v1;apiv1",
    "java_package": "io.github.meshllm.api.v1",
    "java_multiple_files": True,
}
"""Other languages' stub packages (docs/protos.md). buf breaking leaves them out (protos/buf.yaml),
so this pins them: a change moves every Go and Java caller's imports."""


def test_every_proto_file_sets_the_stub_packages_for_other_languages() -> None:
    files = [m.DESCRIPTOR for m in (admin_pb2, generation_pb2, replica_control_pb2)]
    assert sorted(f.name for f in files) == sorted(
        f"meshllm/api/v1/{p.name}" for p in (ROOT / "protos/meshllm/api/v1").glob("*.proto")
    )
    for descriptor in files:
        options = descriptor.GetOptions()
        got = {name: getattr(options, name) for name in STUB_OPTIONS}
        assert got == STUB_OPTIONS, descriptor.name
