"""Configuration of the scheduler process (a frozen dataclass, validated at construction)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from services.core.request import model_id
from services.errors import ConfigError

# Keys of every cluster sharing a Redis live under their own prefix.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True)
class Settings:
    """The DeploymentSettings handed to attention replicas at Register (and by GetSettings)."""

    micro_batches: int = 2
    max_batch_tokens: int = 512
    max_running_requests: int = 64
    dispatch_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        for name in ("micro_batches", "max_batch_tokens", "max_running_requests",
                     "dispatch_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 2**32 - 1:
                raise ConfigError(f"{name} must be an integer in 1..2**32-1, got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything the scheduler needs to start.

    ``node_ttl_s`` is the lease: a node whose last Register/Heartbeat is older has left (nodes
    heartbeat every ttl/3). ``num_experts`` is the expert count per MoE layer of the model
    (placement covers ids 0..num_experts-1). ``replicate_hot`` is how many extra replicas of
    hot experts the placement may add in total (0 = one host per expert). Expert loads are
    polled from ``Expert.GetStats`` every ``stats_interval_s``; a new placement is published on
    a load change only when it lowers the max node load by more than ``rebalance_threshold``
    (a fraction), so placement does not churn on noise. An expert node that most attention
    replicas route around for ``quarantine_after_s`` while its lease holds is planned out for
    ``quarantine_hold_s``, doubling per repeat up to ``quarantine_max_hold_s``
    (services/scheduler/quarantine.py; ``quarantine_after_s`` 0 turns it off).
    ``expert_replicas`` copies of every expert are placed on distinct expert nodes (as many
    as hold it, for fixed nodes; elastic nodes hold what they are assigned); above 1, or with
    elastic nodes, the placement is :func:`~services.scheduler.placement.plan_copies`.
    ``load_timeout_s`` bounds an elastic node's ``Expert.LoadExperts``.
    """

    redis_url: str
    num_experts: int
    model: str = ""
    node_id: str = "scheduler"
    host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int | None = None
    key_prefix: str = "megascale:"
    node_ttl_s: float = 5.0
    settings: Settings = Settings()
    replicate_hot: int = 2
    stats_interval_s: float = 2.0
    rebalance_threshold: float = 0.1
    rpc_timeout_s: float = 2.0
    quarantine_after_s: float = 10.0
    quarantine_hold_s: float = 30.0
    quarantine_max_hold_s: float = 600.0
    expert_replicas: int = 1
    load_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url must start with redis://, rediss:// or unix://, "
                              f"got {self.redis_url!r}")
        if not isinstance(self.num_experts, int) or not 1 <= self.num_experts <= 65536:
            raise ConfigError(f"num_experts must be in 1..65536, got {self.num_experts!r}")
        if not _PREFIX_RE.match(self.key_prefix):
            raise ConfigError(f"key_prefix must be 1..64 chars of [A-Za-z0-9._:-], "
                              f"got {self.key_prefix!r}")
        if not 0.1 <= self.node_ttl_s <= 3600:
            raise ConfigError(f"node_ttl_s must be in 0.1..3600 seconds, got {self.node_ttl_s}")
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port must be in 0..65535, got {self.grpc_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.replicate_hot < 0:
            raise ConfigError(f"replicate_hot must be >= 0, got {self.replicate_hot}")
        if not 1 <= self.expert_replicas <= 64:
            raise ConfigError(f"expert_replicas must be in 1..64, got {self.expert_replicas}")
        if self.load_timeout_s <= 0:
            raise ConfigError(f"load_timeout_s must be > 0, got {self.load_timeout_s}")
        if self.stats_interval_s <= 0:
            raise ConfigError(f"stats_interval_s must be > 0, got {self.stats_interval_s}")
        if not 0 <= self.rebalance_threshold < 1:
            raise ConfigError(f"rebalance_threshold must be in [0, 1), got "
                              f"{self.rebalance_threshold}")
        if self.rpc_timeout_s <= 0:
            raise ConfigError(f"rpc_timeout_s must be > 0, got {self.rpc_timeout_s}")
        if not 0 <= self.quarantine_after_s <= 86400:
            raise ConfigError(f"quarantine_after_s must be in 0..86400 seconds (0 = off), got "
                              f"{self.quarantine_after_s}")
        if not 0 < self.quarantine_hold_s <= self.quarantine_max_hold_s <= 86400:
            raise ConfigError(f"need 0 < quarantine_hold_s <= quarantine_max_hold_s <= 86400 "
                              f"seconds, got {self.quarantine_hold_s} and "
                              f"{self.quarantine_max_hold_s}")

    @property
    def sweep_interval_s(self) -> float:
        """How often expired leases are looked for: a leave is seen within ttl + ttl/4."""
        return max(0.05, self.node_ttl_s / 4)


def num_experts_from_model(model_dir: str | Path) -> tuple[int, str]:
    """``(num_experts, model name)`` from a checkpoint's config.json, without importing torch.

    The model name is the directory's base name (what ``NodeInfo.model`` is compared with).
    """
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model directory {model_dir} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    n = None
    if isinstance(data, dict):  # Mixtral, Qwen3-MoE, DeepSeek spellings; DBRX nests it
        n = data.get("num_local_experts", data.get("num_experts", data.get("n_routed_experts")))
        if n is None and isinstance(data.get("ffn_config"), dict):
            n = data["ffn_config"].get("moe_num_experts")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{path}: 'num_local_experts' (or 'num_experts', 'n_routed_experts') "
                          "must be an integer "
                          f">= 1, got {n!r}")
    return n, model_id(model_dir)
