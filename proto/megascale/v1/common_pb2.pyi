from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class NodeRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_ROLE_UNSPECIFIED: _ClassVar[NodeRole]
    NODE_ROLE_ATTENTION: _ClassVar[NodeRole]
    NODE_ROLE_EXPERT: _ClassVar[NodeRole]
    NODE_ROLE_GATEWAY: _ClassVar[NodeRole]
    NODE_ROLE_SCHEDULER: _ClassVar[NodeRole]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_ATTENTION: NodeRole
NODE_ROLE_EXPERT: NodeRole
NODE_ROLE_GATEWAY: NodeRole
NODE_ROLE_SCHEDULER: NodeRole

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "bad_words", "logprobs", "grammar", "prompt_logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    max_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    min_tokens: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_p: float
    logit_bias: _containers.ScalarMap[int, float]
    bad_words: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    logprobs: int
    grammar: str
    prompt_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., min_p: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., bad_words: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., logprobs: _Optional[int] = ..., grammar: _Optional[str] = ..., prompt_logprobs: _Optional[int] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("logprob", "top_token_ids", "top_logprobs", "rank")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rank: int
    def __init__(self, logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., rank: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "role", "grpc_address", "m2n_url", "model", "kv_blocks", "kv_block_size", "max_running_requests", "expert_ids", "started_at_unix_s", "labels", "elastic")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    M2N_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ELASTIC_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: NodeRole
    grpc_address: str
    m2n_url: str
    model: str
    kv_blocks: int
    kv_block_size: int
    max_running_requests: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    started_at_unix_s: float
    labels: _containers.ScalarMap[str, str]
    elastic: bool
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[NodeRole, str]] = ..., grpc_address: _Optional[str] = ..., m2n_url: _Optional[str] = ..., model: _Optional[str] = ..., kv_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., max_running_requests: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ..., started_at_unix_s: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., elastic: _Optional[bool] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("running", "waiting", "kv_usage", "free_kv_blocks", "step_time_ms", "attention_time_ms", "expert_wait_ms", "tokens_per_s", "expert_queue_rows", "reported_at_unix_s", "expert_nodes_down", "experts_complete")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    EXPERT_QUEUE_ROWS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXPERT_NODES_DOWN_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_usage: float
    free_kv_blocks: int
    step_time_ms: float
    attention_time_ms: float
    expert_wait_ms: float
    tokens_per_s: float
    expert_queue_rows: int
    reported_at_unix_s: float
    expert_nodes_down: _containers.RepeatedScalarFieldContainer[str]
    experts_complete: bool
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., free_kv_blocks: _Optional[int] = ..., step_time_ms: _Optional[float] = ..., attention_time_ms: _Optional[float] = ..., expert_wait_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., expert_queue_rows: _Optional[int] = ..., reported_at_unix_s: _Optional[float] = ..., expert_nodes_down: _Optional[_Iterable[str]] = ..., experts_complete: _Optional[bool] = ...) -> None: ...

class ExpertHost(_message.Message):
    __slots__ = ("node_id", "m2n_url", "grpc_address", "started_at_unix_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    M2N_URL_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    m2n_url: str
    grpc_address: str
    started_at_unix_s: float
    def __init__(self, node_id: _Optional[str] = ..., m2n_url: _Optional[str] = ..., grpc_address: _Optional[str] = ..., started_at_unix_s: _Optional[float] = ...) -> None: ...

class ExpertReplicas(_message.Message):
    __slots__ = ("expert_id", "hosts")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    expert_id: int
    hosts: _containers.RepeatedCompositeFieldContainer[ExpertHost]
    def __init__(self, expert_id: _Optional[int] = ..., hosts: _Optional[_Iterable[_Union[ExpertHost, _Mapping]]] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("epoch", "num_experts", "experts")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    num_experts: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertReplicas]
    def __init__(self, epoch: _Optional[int] = ..., num_experts: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertReplicas, _Mapping]]] = ...) -> None: ...

class DeploymentSettings(_message.Message):
    __slots__ = ("micro_batches", "max_batch_tokens", "max_running_requests", "dispatch_timeout_ms")
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    micro_batches: int
    max_batch_tokens: int
    max_running_requests: int
    dispatch_timeout_ms: int
    def __init__(self, micro_batches: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_running_requests: _Optional[int] = ..., dispatch_timeout_ms: _Optional[int] = ...) -> None: ...

class UpdatePlacementResponse(_message.Message):
    __slots__ = ("applied_epoch",)
    APPLIED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    applied_epoch: int
    def __init__(self, applied_epoch: _Optional[int] = ...) -> None: ...
