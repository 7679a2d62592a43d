from megascale.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadExpertsRequest(_message.Message):
    __slots__ = ("expert_ids",)
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadExpertsResponse(_message.Message):
    __slots__ = ("expert_ids", "load_seconds")
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    load_seconds: float
    def __init__(self, expert_ids: _Optional[_Iterable[int]] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertStats(_message.Message):
    __slots__ = ("node_id", "expert_ids", "load", "rows_by_expert", "messages_received", "bad_frames", "mean_group_rows")
    class RowsByExpertEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ROWS_BY_EXPERT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BAD_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MEAN_GROUP_ROWS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    load: _common_pb2.LoadReport
    rows_by_expert: _containers.ScalarMap[int, int]
    messages_received: int
    bad_frames: int
    mean_group_rows: float
    def __init__(self, node_id: _Optional[str] = ..., expert_ids: _Optional[_Iterable[int]] = ..., load: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ..., rows_by_expert: _Optional[_Mapping[int, int]] = ..., messages_received: _Optional[int] = ..., bad_frames: _Optional[int] = ..., mean_group_rows: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_ms",)
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    timeout_ms: int
    def __init__(self, timeout_ms: _Optional[int] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("drained", "pending_messages")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    PENDING_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    pending_messages: int
    def __init__(self, drained: _Optional[bool] = ..., pending_messages: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("node_id", "m2n_sender_id", "reply_url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    M2N_SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    m2n_sender_id: int
    reply_url: str
    def __init__(self, node_id: _Optional[str] = ..., m2n_sender_id: _Optional[int] = ..., reply_url: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("node_id", "dispatch_url", "expert_ids", "num_experts", "epoch", "m2n_sender_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_URL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    M2N_SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    dispatch_url: str
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    num_experts: int
    epoch: int
    m2n_sender_id: int
    def __init__(self, node_id: _Optional[str] = ..., dispatch_url: _Optional[str] = ..., expert_ids: _Optional[_Iterable[int]] = ..., num_experts: _Optional[int] = ..., epoch: _Optional[int] = ..., m2n_sender_id: _Optional[int] = ...) -> None: ...
