"""Dispatch token rows to expert nodes and combine their replies (the attention side of M2N).

One :class:`ExpertClient` per attention replica owns a libm2n sender to every expert node and one
combine receiver that every expert node replies to. Payload layout: :mod:`services.core.moe_wire`.

Per (layer, micro-batch) :meth:`ExpertClient.dispatch` sends one message to each node that hosts
at least one of the micro-batch's routed experts and returns a :class:`PendingCombine`;
:meth:`ExpertClient.combine` waits for that dispatch's replies (replies for other micro-batches
that arrive meanwhile are kept) and adds the partial sums back into a ``[T, H]`` tensor.

A replicated expert (hosted on several nodes) is served by replica ``token_index % replicas``,
which spreads its rows evenly and deterministically.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

import libm2n
from services.core import moe_wire
from services.core.model import MoEInput


class ExpertUnavailable(RuntimeError):
    """An expert node failed, refused a dispatch, or did not reply within the bound."""


@dataclass(frozen=True)
class ExpertNodeRoute:
    """Where one expert node listens for dispatches and which experts it hosts."""

    node_id: str
    dispatch_url: str
    expert_ids: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """The expert placement an attention replica routes by (validated at construction)."""

    epoch: int
    nodes: tuple[ExpertNodeRoute, ...]
    num_experts: int

    def __post_init__(self) -> None:
        hosted = {e for n in self.nodes for e in n.expert_ids}
        missing = sorted(set(range(self.num_experts)) - hosted)
        if missing:
            raise ValueError(f"placement epoch {self.epoch} hosts no replica of experts {missing}")
        bad = sorted(e for e in hosted if not 0 <= e < self.num_experts)
        if bad:
            raise ValueError(f"placement names expert ids {bad} outside [0, {self.num_experts})")

    def replica_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``table [E, R]`` node index of each replica (padded with -1), ``count [E]``."""
        per_expert: list[list[int]] = [[] for _ in range(self.num_experts)]
        for ni, node in enumerate(self.nodes):
            for e in node.expert_ids:
                per_expert[e].append(ni)
        width = max(len(r) for r in per_expert)
        table = torch.full((self.num_experts, width), -1, dtype=torch.int64)
        for e, r in enumerate(per_expert):
            table[e, : len(r)] = torch.tensor(r, dtype=torch.int64)
        return table, torch.tensor([len(r) for r in per_expert], dtype=torch.int64)


@dataclass
class PendingCombine:
    """Replies still owed for one (layer, micro-batch) dispatch: tag -> (node index, row ids;
    None = every row of the micro-batch)."""

    layer: int
    micro_batch: int
    num_tokens: int
    waiting: dict[int, tuple[int, torch.Tensor | None]] = field(default_factory=dict)
    sent_at: float = 0.0


class ExpertClient:
    """libm2n senders to every expert node plus the combine receiver (module docstring)."""

    def __init__(self, placement: Placement, reply_rx: libm2n.Receiver, sender_id: int,
                 hidden: int, top_k: int, reply_timeout_s: float = 10.0,
                 peer_timeout_s: float = 10.0) -> None:
        self.reply_rx = reply_rx
        self.sender_id = sender_id
        self.hidden = hidden
        self.top_k = top_k
        self.reply_timeout_s = reply_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self._round_trips: list[float] = []  # per dispatch: sent -> last reply, seconds
        self._tags = itertools.count(1)
        self._arrived: dict[int, libm2n.Message] = {}  # tag -> reply that nobody waited for yet
        self._senders: list[libm2n.Sender] = []
        self.placement: Placement | None = None
        # Expert nodes this replica attached to (they hold its reply link); a placement may
        # only name these. node id -> dispatch URL.
        self.attached: dict[str, str] = {n.node_id: n.dispatch_url for n in placement.nodes}
        self.set_placement(placement)

    # ------------------------------------------------------------------ placement
    def set_placement(self, placement: Placement) -> None:
        """Connect to the nodes of ``placement`` (call between steps, never mid-step)."""
        # Links to nodes that stay are kept (only the epoch stamped in headers moves); links
        # to new nodes are opened before the ones to departed nodes are closed, so a failure
        # leaves the old placement fully in force.
        old = {s.url: s for s in self._senders}
        opened: list[libm2n.Sender] = []
        try:
            senders = []
            for n in placement.nodes:
                s = old.get(n.dispatch_url)
                if s is None:
                    s = libm2n.connect(n.dispatch_url, libm2n.SenderConfig(
                        sender_id=self.sender_id, epoch=placement.epoch,
                        peer_timeout_s=self.peer_timeout_s))
                    opened.append(s)
                senders.append(s)
        except BaseException:
            for s in opened:
                s.close()
            raise
        for s in senders:
            s.set_epoch(placement.epoch)
        for s in old.values():
            if all(s is not kept for kept in senders):
                s.close()
        self._senders = senders
        self.placement = placement
        self._table, self._count = placement.replica_table()

    def max_rows(self) -> int:
        """Largest micro-batch (rows) one dispatch slot on every node can hold."""
        width = (self.hidden + 2 * self.top_k) * 4
        return min(s.slot_bytes // width for s in self._senders)

    # ------------------------------------------------------------------ the hot path
    def dispatch(self, step: int, moe_in: MoEInput, micro_batch: int,
                 trace: tuple[bytes, bytes] | None = None) -> PendingCombine:
        """Send each node the rows it serves; never blocks on the experts' compute.

        ``trace`` (trace id, span id) travels in the libm2n header for the expert's span."""
        trace_id, span_id = trace or (None, None)
        pending = PendingCombine(moe_in.layer, micro_batch, moe_in.topk_ids.shape[0],
                                 sent_at=time.perf_counter())
        for ni, row_ids, ids, weights in self._split(moe_in.topk_ids, moe_in.topk_weights):
            rows = moe_in.normed if row_ids is None else moe_in.normed.index_select(0, row_ids)
            payload = moe_wire.pack_dispatch(rows, ids, weights)
            sender = self._senders[ni]
            tag = next(self._tags)
            try:
                sender.send(payload, step=step, layer=moe_in.layer, micro_batch=micro_batch,
                            tag=tag, trace_id=trace_id, span_id=span_id
                            ).result(timeout=self.peer_timeout_s)
            except (libm2n.M2NError, TimeoutError) as exc:
                node = self.placement.nodes[ni].node_id
                raise ExpertUnavailable(f"dispatch to expert node {node} failed: {exc}") from exc
            pending.waiting[tag] = (ni, row_ids)
        return pending

    def _split(self, ids: torch.Tensor, weights: torch.Tensor
               ) -> list[tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """Per destination node: (node index, row ids or None for all rows, ids, weights).

        ids/weights [T, K]; a (row, k) served by another node gets id -1 and weight 0.
        """
        if len(self._senders) == 1:  # one node hosts every expert: no selection at all
            return [(0, None, ids, weights)]
        T = ids.shape[0]
        token = torch.arange(T, device=ids.device)[:, None]         # [T, 1]
        replica = token % self._count[ids]                          # [T, K]
        owner = self._table[ids, replica]                           # [T, K] node index
        out = []
        for ni in range(len(self._senders)):
            mine = owner == ni                                       # [T, K]
            row_ids = mine.any(dim=1).nonzero().squeeze(1)          # [n]
            if row_ids.numel() == 0:
                continue
            sel = mine.index_select(0, row_ids)
            out.append((ni, row_ids, torch.where(sel, ids.index_select(0, row_ids), -1),
                        torch.where(sel, weights.index_select(0, row_ids), 0.0)))
        return out

    def combine(self, pending: PendingCombine, dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
        """Wait for every reply of ``pending``; returns the summed expert output [T, H]."""
        out = torch.zeros(pending.num_tokens, self.hidden, dtype=dtype, device=device)
        deadline = time.monotonic() + self.reply_timeout_s
        while pending.waiting:
            msg = self._next_reply(pending, deadline)
            ni, row_ids = pending.waiting.pop(msg.header.tag)
            with msg:
                part = msg.tensor()
                if moe_wire.is_error(part):
                    raise ExpertUnavailable(
                        f"expert node {self.placement.nodes[ni].node_id} refused layer "
                        f"{pending.layer}: {moe_wire.error_text(part)}")
                want = pending.num_tokens if row_ids is None else row_ids.numel()
                if tuple(part.shape) != (want, self.hidden):
                    raise ExpertUnavailable(
                        f"expert node {self.placement.nodes[ni].node_id} replied with shape "
                        f"{tuple(part.shape)}, expected ({want}, {self.hidden})")
                part = part.to(device=device, dtype=dtype)
                if row_ids is None:
                    out.add_(part)
                else:
                    out.index_add_(0, row_ids.to(device), part)
        self._round_trips.append(time.perf_counter() - pending.sent_at)
        return out

    def _next_reply(self, pending: PendingCombine, deadline: float) -> libm2n.Message:
        for tag in pending.waiting:
            if tag in self._arrived:
                return self._arrived.pop(tag)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                nodes = sorted({self.placement.nodes[ni].node_id
                                for ni, _ in pending.waiting.values()})
                raise ExpertUnavailable(f"expert node(s) {', '.join(nodes)} did not reply to "
                                        f"layer {pending.layer} within {self.reply_timeout_s:g} s")
            try:
                msg = self.reply_rx.recv(timeout=min(left, 0.5))
            except TimeoutError:
                self._check_senders()
                continue
            if msg.header.tag in pending.waiting:
                return msg
            self._arrived[msg.header.tag] = msg

    def _check_senders(self) -> None:
        """Fail fast when a node's link is known to be down (instead of waiting the bound)."""
        for ni, s in enumerate(self._senders):
            try:
                s.check()
            except libm2n.M2NError as exc:
                raise ExpertUnavailable(f"expert node {self.placement.nodes[ni].node_id} "
                                        f"is gone: {exc}") from exc

    def take_round_trips(self) -> list[float]:
        """Round-trip times recorded since the last call (then forgotten)."""
        out, self._round_trips = self._round_trips, []
        return out

    def discard_pending(self) -> None:
        """Drop replies kept for abandoned dispatches (after a failed step)."""
        for msg in self._arrived.values():
            msg.release()
        self._arrived.clear()

    def close(self) -> None:
        self.discard_pending()
        for s in self._senders:
            s.close()
        self._senders = []
