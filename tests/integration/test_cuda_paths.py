"""The CUDA code paths' own logic, checked on the CPU (the GPU runs are in test_gpu.py).

What reaches CTranslate2 for ``--device cuda:N``, the errors a missing GPU or an unsupported
compute type give, and which NVML device reports a CUDA device's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import ctranslate2
import grpc
import pytest
from conftest import StartReplica

from meshllm.api.errors import FailedPrecondition, InvalidArgument
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.replica.cli import config_from_args, parse_args
from meshllm.replica.engines.ctranslate2 import check_device
from meshllm.replica.memory import device_memory, nvml_device
from meshllm.replica.model import LoadedModel

NO_GPU = ctranslate2.get_cuda_device_count() == 0


class RecordingGenerator:
    """Stands in for ``ctranslate2.Generator``: records its arguments, runs nothing."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        self.calls.append({"model_path": model_path, **kwargs})

    def unload_model(self) -> None:
        pass


async def test_device_and_compute_type_flags_reach_ctranslate2(
    monkeypatch: pytest.MonkeyPatch, demo_dir: Path
) -> None:
    monkeypatch.setattr(ctranslate2, "Generator", RecordingGenerator)
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 2)
    monkeypatch.setattr(
        ctranslate2,
        "get_supported_compute_types",
        lambda kind, index=0: {"float32", "float16", "int8_float16"},
    )
    RecordingGenerator.calls = []
    config = config_from_args(
        parse_args(["--model", "demo", "--device", "cuda:1", "--compute-type", "int8_float16"])
    )
    assert config.model is not None
    model = LoadedModel.load(
        config.model,
        device=config.device,
        replica_name="r",
        max_input_chars=1000,
        batch_window_ms=0,
        engine_process=False,  # the patched library lives in this process
    )
    await model.close()
    (call,) = RecordingGenerator.calls
    assert (call["device"], call["device_index"], call["compute_type"]) == (
        "cuda",
        1,
        "int8_float16",
    )
    assert call["model_path"] == str(demo_dir)
    assert (call["inter_threads"], call["intra_threads"]) == (2, 1)  # 2 CUDA streams share weights


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is visible here")
def test_cuda_device_without_a_gpu_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition) as e:
        check_device("cuda:0", "")
    assert e.value.reason == "DEVICE_UNAVAILABLE" and "0 CUDA devices" in e.value.message


def test_unsupported_compute_type_names_the_supported_ones() -> None:
    with pytest.raises(InvalidArgument) as e:
        check_device("cpu", "float16")
    assert [v.field for v in e.value.field_violations] == ["compute_type"]
    assert "float32" in e.value.message and "int8" in e.value.message
    for fine in ("", "default", "auto", "int8", "float32"):
        check_device("cpu", fine)


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is visible here")
async def test_replica_on_a_missing_gpu_reports_a_failed_load(start_replica: StartReplica) -> None:
    server = await start_replica(None, device="cuda:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        control = rc_grpc.ReplicaControlStub(channel)
        spec = rc.ModelSpec(id="demo", path="demo", engine="ctranslate2")
        status = await control.LoadModel(rc.LoadModelRequest(spec=spec, wait=True))
    assert status.state == rc.REPLICA_STATE_FAILED
    assert "not visible to CTranslate2" in status.error
    assert status.memory.source == "process"  # no NVML device to ask: the process's memory


@pytest.mark.parametrize(
    ("device", "visible", "expected"),
    [
        ("cuda:0", None, 0),
        ("cuda:3", None, 3),
        ("cuda", None, 0),
        ("cuda:0", "2,3", 2),
        ("cuda:1", " 2, 3 ", 3),
        ("cuda:2", "2,3", None),
        ("cuda:0", "GPU-8f1e-uuid", "GPU-8f1e-uuid"),
        ("cuda:0", "MIG-1/2/3", None),
        ("cuda:0", "", None),
    ],
)
def test_cuda_index_maps_to_the_nvml_device_through_cuda_visible_devices(
    device: str, visible: str | None, expected: int | str | None
) -> None:
    assert nvml_device(device, visible) == expected


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is visible here")
def test_cuda_memory_falls_back_to_the_process_without_nvml() -> None:
    memory = device_memory("cuda:0")
    assert memory.source == "process" and memory.device == "cuda:0"
    assert 0 < memory.used_bytes < memory.total_bytes
