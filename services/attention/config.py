"""Configuration of one attention replica (a frozen dataclass, validated at construction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.attention.batching import BatchingConfig
from services.core.runtime import COMPUTE_DTYPES
from services.errors import ConfigError


@dataclass(frozen=True)
class AttentionConfig:
    """Everything an attention replica needs to start.

    ``expert_nodes`` are the gRPC addresses of the expert nodes; at start the replica attaches to
    each (``Expert.Attach``), learns its libm2n dispatch URL and hosted experts, and builds the
    placement from them (the scheduler replaces it later through ``UpdatePlacement``). Empty
    with a ``scheduler``: the replica waits for the scheduler's first placement and attaches
    to the nodes it names (an elastic expert pool). ``expert_wait_s``: how long a step whose
    experts have no live replica waits, its requests paused (re-queued, resumed by
    recompute), for a placement that serves them again before they fail.
    ``m2n_url`` is where this replica receives combines (``tcp://127.0.0.1:0`` picks a port;
    ``shm://NAME`` for same-host expert nodes). ``local_experts`` (colocated mode,
    services/attention/local_experts.py) computes every expert in this process instead: then
    ``expert_nodes`` is empty.
    """

    model_dir: Path
    expert_nodes: tuple[str, ...]
    node_id: str = "attention-0"
    m2n_sender_id: int = 0            # this replica's id on every libm2n link (unique per replica)
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # what peers dial; see services.common.net
    grpc_port: int = 0                # 0 = pick a free port (reported in the ready file)
    metrics_port: int | None = None   # Prometheus /metrics; None = off, 0 = pick a free port
    m2n_url: str = "tcp://127.0.0.1:0"
    micro_batches: int = 2
    stream_interval: int = 1          # emit a request's tokens every N tokens (1 = each token)
    block_size: int = 16
    num_blocks: int | None = None     # KV blocks; None = sized at start (server.kv_blocks)
    gpu_memory_utilization: float = 0.9  # on CUDA: fraction of the card this replica may use
    batching: BatchingConfig = BatchingConfig()
    enable_prefix_caching: bool = True  # share full KV blocks by content (prefix_cache.py)
    served_model_name: str = ""       # the model_name label of its metrics; "" = model id
    expert_timeout_s: float = 10.0    # bound on a node's replies before it is marked down
    expert_readmit_s: float = 30.0    # retry a down node with a healthy link after this; 0 = no
    expert_wait_s: float = 30.0       # pause requests this long for lost experts to come back
    scheduler: str | None = None      # the scheduler service's gRPC address; None = none
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    local_experts: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"model_dir {self.model_dir} has no config.json")
        if self.local_experts and self.expert_nodes:
            raise ConfigError("local_experts computes every expert here: give no expert_nodes")
        if not self.local_experts and not self.expert_nodes and not self.scheduler:
            raise ConfigError("expert_nodes must name at least one expert node address (or "
                              "give a scheduler to learn them from its placement, or set "
                              "local_experts)")
        if not 1 <= self.micro_batches <= 16:
            raise ConfigError(f"micro_batches must be in 1..16, got {self.micro_batches}")
        if not 1 <= self.stream_interval <= 1024:
            raise ConfigError(f"stream_interval must be in 1..1024, got {self.stream_interval}")
        if self.block_size < 1 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ConfigError(f"block_size and num_blocks must be >= 1, got {self.block_size}, "
                              f"{self.num_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if not 0 <= self.m2n_sender_id <= 2**32 - 1:
            raise ConfigError(f"m2n_sender_id must be in 0..2**32-1, got {self.m2n_sender_id}")
        if not self.expert_timeout_s > 0:
            raise ConfigError(f"expert_timeout_s must be > 0, got {self.expert_timeout_s}")
        if not self.expert_wait_s >= 0:
            raise ConfigError(f"expert_wait_s must be >= 0, got {self.expert_wait_s}")
        if not self.expert_readmit_s >= 0:
            raise ConfigError(f"expert_readmit_s must be >= 0, got {self.expert_readmit_s}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                              f"{self.dtype!r}")
