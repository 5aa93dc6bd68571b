from meshllm.api.v1 import replica_control_pb2 as _replica_control_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdminListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelPlacement(_message.Message):
    __slots__ = ("model", "configured", "desired_replicas", "max_replicas", "replicas", "ready_replicas", "pending")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    model: str
    configured: bool
    desired_replicas: int
    max_replicas: int
    replicas: _containers.RepeatedCompositeFieldContainer[_replica_control_pb2.ReplicaStatus]
    ready_replicas: int
    pending: str
    def __init__(self, model: _Optional[str] = ..., configured: _Optional[bool] = ..., desired_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[_replica_control_pb2.ReplicaStatus, _Mapping]]] = ..., ready_replicas: _Optional[int] = ..., pending: _Optional[str] = ...) -> None: ...

class AdminListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelPlacement]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelPlacement, _Mapping]]] = ...) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReplicasResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[_replica_control_pb2.ReplicaStatus]
    def __init__(self, replicas: _Optional[_Iterable[_Union[_replica_control_pb2.ReplicaStatus, _Mapping]]] = ...) -> None: ...

class AdminLoadModelRequest(_message.Message):
    __slots__ = ("model", "replicas", "overrides", "wait")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: int
    overrides: _replica_control_pb2.ModelSpec
    wait: bool
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[int] = ..., overrides: _Optional[_Union[_replica_control_pb2.ModelSpec, _Mapping]] = ..., wait: _Optional[bool] = ...) -> None: ...

class AdminUnloadModelRequest(_message.Message):
    __slots__ = ("model", "drain_timeout_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    drain_timeout_s: float
    def __init__(self, model: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class ScaleModelRequest(_message.Message):
    __slots__ = ("model", "replicas", "drain_timeout_s", "wait")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: int
    drain_timeout_s: float
    wait: bool
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[int] = ..., drain_timeout_s: _Optional[float] = ..., wait: _Optional[bool] = ...) -> None: ...

class DrainReplicaRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class UndrainReplicaRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class GetQuotaUsageRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class QuotaUsage(_message.Message):
    __slots__ = ("tenant", "limit", "used", "limit_value", "resets_in_s")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_VALUE_FIELD_NUMBER: _ClassVar[int]
    RESETS_IN_S_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limit: str
    used: int
    limit_value: int
    resets_in_s: float
    def __init__(self, tenant: _Optional[str] = ..., limit: _Optional[str] = ..., used: _Optional[int] = ..., limit_value: _Optional[int] = ..., resets_in_s: _Optional[float] = ...) -> None: ...

class GetQuotaUsageResponse(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.RepeatedCompositeFieldContainer[QuotaUsage]
    def __init__(self, usage: _Optional[_Iterable[_Union[QuotaUsage, _Mapping]]] = ...) -> None: ...
