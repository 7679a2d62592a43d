from megascale.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterResponse(_message.Message):
    __slots__ = ("epoch", "lease_ttl_s", "settings")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    lease_ttl_s: float
    settings: _common_pb2.DeploymentSettings
    def __init__(self, epoch: _Optional[int] = ..., lease_ttl_s: _Optional[float] = ..., settings: _Optional[_Union[_common_pb2.DeploymentSettings, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    load: _common_pb2.LoadReport
    def __init__(self, node_id: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("epoch", "placement_changed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_CHANGED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    placement_changed: bool
    def __init__(self, epoch: _Optional[int] = ..., placement_changed: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class PickReplicaRequest(_message.Message):
    __slots__ = ("prompt_tokens", "exclude_node_ids", "model", "prefix_hashes")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HASHES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    exclude_node_ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    prefix_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_tokens: _Optional[int] = ..., exclude_node_ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., prefix_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class PickReplicaResponse(_message.Message):
    __slots__ = ("node_id", "address", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchPlacementRequest(_message.Message):
    __slots__ = ("after_epoch",)
    AFTER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    after_epoch: int
    def __init__(self, after_epoch: _Optional[int] = ...) -> None: ...

class GetSettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
