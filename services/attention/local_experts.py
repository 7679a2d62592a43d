"""Colocated mode: the replica computes every expert in-process instead of dispatching.

:class:`LocalExperts` stands where :class:`~services.attention.dispatch.ExpertClient` stands for
the engine and the ping-pong runner: ``dispatch`` runs the layer's expert FFNs at once (the
grouped GEMM of :class:`~services.core.model.ExpertSide`, all experts) and ``combine`` hands the
result back. There is no link, so nothing fails over, nothing is ever down and no placement
from the scheduler changes where an expert runs.

When this pays (``megascale up`` picks it; ``--local-experts`` forces it): disaggregation wins
by giving experts their own hardware, so that their batch grows with the number of replicas
while attention runs elsewhere. When attention and experts would share the same cores or the
same GPU anyway, splitting them only adds the M2N traffic and a second process competing for
the same compute; one process that runs both, with every core, is the fastest honest answer.
One lane (``micro_batches = 1``) is right here: lanes exist to overlap with remote experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.attention.routing import ExpertNodeRoute, Placement
from services.core.model import ExpertSide, MoEInput

__all__ = ["LOCAL_NODE_ID", "LocalCombine", "LocalExperts"]

LOCAL_NODE_ID = "local"


@dataclass
class LocalCombine:
    """A dispatch that has already been computed: ``out`` [T, H] in the compute dtype."""

    layer: int
    out: torch.Tensor


class LocalExperts:
    """Every expert of the model, computed in the replica's own process (module docstring)."""

    def __init__(self, experts: ExpertSide) -> None:
        cfg = experts.cfg
        missing = sorted(set(range(cfg.num_experts)) - set(experts.expert_ids))
        if missing:
            raise ValueError(f"colocated experts must hold every expert; missing {missing}")
        self.experts = experts
        self.placement = Placement(0, (ExpertNodeRoute(LOCAL_NODE_ID, "local://",
                                                       tuple(range(cfg.num_experts))),),
                                   cfg.num_experts)
        # What the engine and metrics read off an ExpertClient; constant here.
        self.attached: dict[str, str] = {}
        self.reattached: set[str] = set()
        self.down: set[str] = set()
        self.failovers = 0
        self.dropped_replies = 0

    # ------------------------------------------------------------ the ExpertClient surface
    def max_rows(self) -> int:
        return 1 << 62  # no slot to fill: any step the batcher plans fits

    def routes_complete(self) -> bool:
        return True

    def set_placement(self, placement: Placement) -> None:
        """Placements from the scheduler name remote nodes; every expert stays local."""

    def dispatch(self, step: int, moe_in: MoEInput, micro_batch: int,
                 trace: tuple[bytes, bytes] | None = None) -> LocalCombine:
        out = self.experts.forward(moe_in.layer, moe_in.normed, moe_in.topk_ids,
                                   moe_in.topk_weights)
        return LocalCombine(moe_in.layer, out)

    def ready(self, pending: LocalCombine) -> bool:
        return True

    def combine(self, pending: LocalCombine, dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
        return pending.out.to(dtype=dtype, device=device)

    def take_round_trips(self) -> list[float]:
        return []

    def discard(self, pending: LocalCombine) -> None:
        pass

    def close(self) -> None:
        pass
