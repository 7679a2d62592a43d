"""Configuration of one expert node (a frozen dataclass, validated at construction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.core.runtime import COMPUTE_DTYPES
from services.errors import ConfigError


@dataclass(frozen=True)
class ExpertConfig:
    """Everything an expert node needs to start.

    ``expert_ids`` are the experts (of every sparse layer) this node loads and serves; the same
    id may be hosted by several nodes (replicas). ``m2n_url`` is where dispatches arrive
    (``tcp://127.0.0.1:0`` picks a port). A dispatch receive slot holds one micro-batch of an
    attention replica: ``max_batch_tokens`` rows in the wire layout of ``dtype``
    (services/core/moe_wire.py). ``slot_bytes`` 0 derives the slot size from that and the
    model's shape; a positive value sets it (it then caps the replicas' step tokens).
    ``elastic`` (``--experts auto``): ``expert_ids`` is empty at start and the node loads what
    the scheduler assigns it (``Expert.LoadExperts``).
    """

    model_dir: Path
    expert_ids: tuple[int, ...]
    node_id: str = "expert-0"
    m2n_sender_id: int = 1 << 16      # sender id on reply links; distinct from replicas' ids
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # what peers dial; see services.common.net
    grpc_port: int = 0
    metrics_port: int | None = None
    m2n_url: str = "tcp://127.0.0.1:0"
    max_batch_tokens: int = 512       # the replicas' largest step: rows one slot must hold
    slot_bytes: int = 0               # 0 = derive from max_batch_tokens and the model's shape
    slots_per_sender: int = 8
    # Reply links this node takes slot memory for: its receiver refuses senders past
    # max_attention_replicas x slots_per_sender x slot_bytes, whoever they are.
    max_attention_replicas: int = 64
    epoch: int = 0
    scheduler: str | None = None      # scheduler gRPC address; None = run without one
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    elastic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "expert_ids", tuple(sorted(set(self.expert_ids))))
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"model_dir {self.model_dir} has no config.json")
        if self.elastic and self.expert_ids:
            raise ConfigError("an elastic expert node (--experts auto) starts with no experts")
        if not self.expert_ids and not self.elastic:
            raise ConfigError("expert_ids must name at least one expert")
        if self.expert_ids and min(self.expert_ids) < 0:
            raise ConfigError(f"expert_ids must be >= 0, got {min(self.expert_ids)}")
        if not 0 <= self.m2n_sender_id <= 2**32 - 1:
            raise ConfigError(f"m2n_sender_id must be in 0..2**32-1, got {self.m2n_sender_id}")
        if self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if not (self.slot_bytes == 0 or self.slot_bytes >= 4096) or self.slots_per_sender < 1:
            raise ConfigError("slot_bytes must be 0 (derive) or >= 4096, and slots_per_sender "
                              ">= 1")
        if not 1 <= self.max_attention_replicas <= 65536:
            raise ConfigError(f"max_attention_replicas must be in 1..65536, got "
                              f"{self.max_attention_replicas}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                              f"{self.dtype!r}")


def parse_expert_ids(text: str) -> tuple[int, ...]:
    """``"0,1,4-7"`` -> (0, 1, 4, 5, 6, 7); ConfigError naming the bad part."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"bad expert id list {text!r}: cannot parse {part!r}") from None
    return tuple(out)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"shard:I/N"`` -> (I, N) with 0 <= I < N; ConfigError otherwise."""
    try:
        index, count = (int(x) for x in spec.removeprefix("shard:").split("/"))
    except ValueError:
        raise ConfigError(f"bad expert shard {spec!r}: expected shard:I/N") from None
    if not 0 <= index < count:
        raise ConfigError(f"bad expert shard {spec!r}: need 0 <= I < N")
    return index, count


def partition_experts(num_experts: int, nodes: int, replicate: Sequence[int] = ()
                      ) -> list[list[int]]:
    """Split expert ids over ``nodes`` contiguously; ids in ``replicate`` also go on the next
    node (a redundant replica), e.g. (8, 3) -> [[0,1,2], [3,4,5], [6,7]]."""
    if not 1 <= nodes <= num_experts:
        raise ValueError(f"need 1..{num_experts} expert nodes, got {nodes}")
    per, extra = divmod(num_experts, nodes)
    out, start = [], 0
    for i in range(nodes):
        n = per + (1 if i < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    for e in replicate:
        home = next(i for i, ids in enumerate(out) if e in ids)
        out[(home + 1) % nodes].append(e)
    return [sorted(set(ids)) for ids in out]
