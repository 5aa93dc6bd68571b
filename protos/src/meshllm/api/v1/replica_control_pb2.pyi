from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_EMPTY: _ClassVar[ReplicaState]
    REPLICA_STATE_LOADING: _ClassVar[ReplicaState]
    REPLICA_STATE_READY: _ClassVar[ReplicaState]
    REPLICA_STATE_DRAINING: _ClassVar[ReplicaState]
    REPLICA_STATE_UNLOADING: _ClassVar[ReplicaState]
    REPLICA_STATE_FAILED: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_EMPTY: ReplicaState
REPLICA_STATE_LOADING: ReplicaState
REPLICA_STATE_READY: ReplicaState
REPLICA_STATE_DRAINING: ReplicaState
REPLICA_STATE_UNLOADING: ReplicaState
REPLICA_STATE_FAILED: ReplicaState

class ModelSpec(_message.Message):
    __slots__ = ("id", "engine", "path", "compute_type", "context_length", "default_max_tokens", "max_tokens_limit", "max_batch_size", "inter_threads", "intra_threads", "chat_template", "max_queued", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INTER_THREADS_FIELD_NUMBER: _ClassVar[int]
    INTRA_THREADS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    engine: str
    path: str
    compute_type: str
    context_length: int
    default_max_tokens: int
    max_tokens_limit: int
    max_batch_size: int
    inter_threads: int
    intra_threads: int
    chat_template: str
    max_queued: int
    options: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., engine: _Optional[str] = ..., path: _Optional[str] = ..., compute_type: _Optional[str] = ..., context_length: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., inter_threads: _Optional[int] = ..., intra_threads: _Optional[int] = ..., chat_template: _Optional[str] = ..., max_queued: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("spec", "wait")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    wait: bool
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., wait: _Optional[bool] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("drain_timeout_s", "model")
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    drain_timeout_s: float
    model: str
    def __init__(self, drain_timeout_s: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class DeviceMemory(_message.Message):
    __slots__ = ("device", "used_bytes", "total_bytes", "source")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    device: str
    used_bytes: int
    total_bytes: int
    source: str
    def __init__(self, device: _Optional[str] = ..., used_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("replica_id", "state", "model", "queued", "running", "tokens_in_flight", "tokens_per_second", "cache_utilization", "requests_total", "tokens_total", "timestamp_ms", "device", "capacity")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CACHE_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    state: ReplicaState
    model: str
    queued: int
    running: int
    tokens_in_flight: int
    tokens_per_second: float
    cache_utilization: float
    requests_total: int
    tokens_total: int
    timestamp_ms: int
    device: str
    capacity: int
    def __init__(self, replica_id: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., model: _Optional[str] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., tokens_in_flight: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., cache_utilization: _Optional[float] = ..., requests_total: _Optional[int] = ..., tokens_total: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., device: _Optional[str] = ..., capacity: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "state", "spec", "device", "error", "load", "memory", "version")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    state: ReplicaState
    spec: ModelSpec
    device: str
    error: str
    load: LoadReport
    memory: DeviceMemory
    version: str
    def __init__(self, replica_id: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., device: _Optional[str] = ..., error: _Optional[str] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., memory: _Optional[_Union[DeviceMemory, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...
