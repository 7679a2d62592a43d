"""Dispatch token rows to expert nodes and combine their replies (the attention side of M2N).

One :class:`ExpertClient` per attention replica owns a libm2n sender to every expert node and one
combine receiver that every expert node replies to. Payload layout: :mod:`services.core.moe_wire`.

Per (layer, micro-batch) :meth:`ExpertClient.dispatch` sends one message to each node that hosts
at least one of the micro-batch's routed experts and returns a :class:`PendingCombine`;
:meth:`ExpertClient.combine` waits for that dispatch's replies (replies for other micro-batches
that arrive meanwhile are kept) and adds the partial sums back into a ``[T, H]`` tensor.

Which node serves which rows: :mod:`services.attention.routing`. **Failover**: when a node's
link breaks (a send fails, or the link check fails while waiting) or it does not reply within
``reply_timeout_s``, the client marks it down, re-sends the parts it still owed to other
replicas of the same experts, and routes later dispatches around it; replies that the node
sends late are dropped. Only when an expert has no live replica left does the step fail with
:class:`ExpertUnavailable`. A down node comes back when a new placement epoch names it over a
healthy link (reconnecting a broken one: a restarted node), or, ``readmit_after_s`` after it
went down, when its link is healthy (a hang that ended; if it hangs again it is marked down
again after another ``reply_timeout_s``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

import libm2n
from services.attention.routing import (
    ExpertUnavailable,
    Part,
    Placement,
    Routes,
    StalePlacement,
)
from services.core import moe_wire
from services.core.model import MoEInput

__all__ = ["ExpertClient", "ExpertUnavailable", "PendingCombine"]

log = logging.getLogger(__name__)


@dataclass
class PendingCombine:
    """Replies still owed for one (layer, micro-batch) dispatch.

    ``waiting``: tag -> the :data:`~services.attention.routing.Part` sent under it (row ids
    None = every row). ``rows`` [T, H] (the expert input) and ``trace`` are kept so that a part
    can be re-sent to another replica when its node fails.
    """

    step: int
    layer: int
    micro_batch: int
    rows: torch.Tensor
    trace: tuple[bytes, bytes] | None = None
    waiting: dict[int, Part] = field(default_factory=dict)
    sent_at: float = 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.rows.shape[0])


class ExpertClient:
    """libm2n senders to every expert node plus the combine receiver (module docstring)."""

    def __init__(self, placement: Placement, reply_rx: libm2n.Receiver, sender_id: int,
                 hidden: int, top_k: int, reply_timeout_s: float = 10.0,
                 peer_timeout_s: float = 10.0, readmit_after_s: float = 30.0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 auth_token: bytes | None = None,
                 reply_senders: Mapping[str, int] | None = None) -> None:
        self.reply_rx = reply_rx
        self.sender_id = sender_id
        self.hidden = hidden
        self.top_k = top_k
        self.dtype = dtype                  # the compute dtype: what rows travel in
        self.device = torch.device(device)  # where the routing tables live (the rows' device)
        self.auth_token = auth_token        # the cluster token its dispatch links present
        self.reply_timeout_s = reply_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self.readmit_after_s = readmit_after_s  # 0: only a new placement epoch re-admits
        self._down_at: dict[str, float] = {}  # node id -> time.monotonic() it went down
        self.failovers = 0  # parts re-sent to another replica because their node went down
        self.dropped_replies = 0  # late replies to re-sent parts or failed steps
        # node id -> libm2n sender id its replies come from (filled as nodes are attached).
        # A reply carrying an outstanding tag from any other sender is dropped and counted:
        # a peer on the reply port cannot answer for a node it is not.
        self.reply_senders: Mapping[str, int] = reply_senders if reply_senders is not None \
            else {}
        self.forged_replies = 0
        self.down: dict[str, str] = {}  # node id -> why it is considered down
        self._round_trips: list[float] = []  # per dispatch: sent -> last reply, seconds
        # Tags start at a random point, so a peer cannot guess the ones in flight.
        self._tags = itertools.count(secrets.randbits(62))
        self._arrived: dict[int, libm2n.Message] = {}  # tag -> reply that nobody waited for yet
        # Tags sent and not yet combined -> the sender id their reply must come from (None:
        # unknown). A reply whose tag is not here belongs to a part that was re-sent
        # elsewhere or to a failed step: it is dropped, never held (a held reply keeps a
        # receive slot of its node busy).
        self._outstanding: dict[int, int | None] = {}
        self._senders: list[libm2n.Sender] = []
        self.placement: Placement | None = None
        # Expert nodes this replica attached to (they hold its reply link); a placement may
        # only name these. node id -> dispatch URL.
        self.attached: dict[str, str] = {n.node_id: n.dispatch_url for n in placement.nodes}
        # Nodes attached again since the last placement (a restart): their dispatch link is
        # opened afresh even where the old one does not look broken yet.
        self.reattached: set[str] = set()
        self.set_placement(placement)

    # ------------------------------------------------------------------ placement
    def set_placement(self, placement: Placement) -> None:
        """Connect to the nodes of ``placement`` (call between steps, never mid-step).

        A node marked down stays down within its epoch; a new epoch re-admits every node
        whose link is healthy, reconnecting a broken link first (a restarted node)."""
        # Links to nodes that stay are kept (only the epoch stamped in headers moves); links
        # to new nodes are opened before the ones to departed nodes are closed, so a failure
        # leaves the old placement fully in force.
        new_epoch = self.placement is None or placement.epoch != self.placement.epoch
        old = {s.url: s for s in self._senders}
        opened: list[libm2n.Sender] = []
        down: dict[str, str] = {}
        try:
            senders = []
            for n in placement.nodes:
                s = old.get(n.dispatch_url)
                renew = n.node_id in self.reattached
                if s is None or renew or (new_epoch and not s.healthy()):
                    if s is not None:
                        # The node's receiver refuses our sender id while the old link holds
                        # it (a node that froze and resumed still has it): close it first.
                        s.close()
                    try:
                        fresh = libm2n.connect(n.dispatch_url, libm2n.SenderConfig(
                            sender_id=self.sender_id, epoch=placement.epoch,
                            peer_timeout_s=self.peer_timeout_s, auth_token=self.auth_token))
                    except libm2n.M2NError as exc:
                        if s is None:  # a node we never reached: refuse the placement
                            raise
                        down[n.node_id] = f"cannot reconnect: {exc}"  # keep the dead link
                    else:
                        opened.append(fresh)
                        s = fresh
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
        if not new_epoch:
            down.update((n.node_id, self.down[n.node_id]) for n in placement.nodes
                        if n.node_id in self.down)
        self._senders = senders
        self.placement = placement
        self.down = down
        self.reattached -= {n.node_id for n in placement.nodes}
        now = time.monotonic()
        self._down_at = {n: self._down_at.get(n, now) for n in down}
        self._routes = Routes(placement, self._down_indices(), self.device)

    def routes_complete(self) -> bool:
        """Every expert has a live replica (read from any thread: one attribute read)."""
        return self._routes.complete

    def _down_indices(self) -> dict[int, str]:
        return {ni: self.down[n.node_id] for ni, n in enumerate(self.placement.nodes)
                if n.node_id in self.down}

    def _mark_down(self, ni: int, why: str) -> None:
        node = self.placement.nodes[ni].node_id
        if node in self.down:
            return
        log.error("expert node %s is down (%s); routing around it", node, why)
        self.down[node] = why
        self._down_at[node] = time.monotonic()
        self._routes = Routes(self.placement, self._down_indices(), self.device)

    def _readmit(self) -> None:
        """Take back nodes down for ``readmit_after_s`` whose link is healthy."""
        now = time.monotonic()
        back = []
        for ni, n in enumerate(self.placement.nodes):
            if n.node_id in self.down and now - self._down_at[n.node_id] >= self.readmit_after_s:
                if self._senders[ni].healthy():
                    back.append(ni)
                else:  # still broken: probe again one interval later
                    self._down_at[n.node_id] = now
        if not back:
            return
        for ni in back:
            node = self.placement.nodes[ni].node_id
            log.warning("re-admitting expert node %s: its link is healthy", node)
            del self.down[node], self._down_at[node]
        self._routes = Routes(self.placement, self._down_indices(), self.device)

    def max_rows(self) -> int:
        """Largest micro-batch (rows) one dispatch slot on every node can hold."""
        width = moe_wire.row_bytes(self.hidden, self.top_k, self.dtype)
        return min(s.slot_bytes // width for s in self._senders)

    # ------------------------------------------------------------------ the hot path
    def dispatch(self, step: int, moe_in: MoEInput, micro_batch: int,
                 trace: tuple[bytes, bytes] | None = None) -> PendingCombine:
        """Send each node the rows it serves; never blocks on the experts' compute.

        ``trace`` (trace id, span id) travels in the libm2n header for the expert's span."""
        if self.down and self.readmit_after_s:
            self._readmit()
        pending = PendingCombine(step, moe_in.layer, micro_batch, moe_in.normed, trace,
                                 sent_at=time.perf_counter())
        self._send(pending, None, self._routes.split(moe_in.topk_ids, moe_in.topk_weights,
                                                     self._offset(pending)))
        return pending

    def _send(self, pending: PendingCombine, base: torch.Tensor | None, parts: list[Part]
              ) -> None:
        """Send ``parts`` (their row ids index ``base``, the rows of ``pending`` they came
        from; None = all rows); a part whose send fails goes to another replica."""
        trace_id, span_id = pending.trace or (None, None)
        for ni, sub, ids, weights in parts:
            row_ids = sub if base is None else base if sub is None else base.index_select(0, sub)
            rows = pending.rows if row_ids is None else pending.rows.index_select(0, row_ids)
            tag = next(self._tags)
            payload = moe_wire.pack_dispatch(rows, ids, weights)
            if payload.device.type != "cpu":
                # libm2n sends from host memory: one device-to-host copy, which waits for this
                # layer's attention to finish (a GPU transport would send from the device).
                payload = payload.cpu()
            try:
                self._senders[ni].send(payload,
                                       step=pending.step, layer=pending.layer,
                                       micro_batch=pending.micro_batch, tag=tag,
                                       trace_id=trace_id, span_id=span_id
                                       ).result(timeout=self.peer_timeout_s)
            except (libm2n.M2NError, TimeoutError) as exc:
                self._mark_down(ni, f"dispatch failed: {exc}")
                self._resend(pending, (ni, row_ids, ids, weights))
                continue
            pending.waiting[tag] = (ni, row_ids, ids, weights)
            self._outstanding[tag] = self.reply_senders.get(self.placement.nodes[ni].node_id)

    def _resend(self, pending: PendingCombine, part: Part) -> None:
        """Route a part owed by a node now marked down to the other replicas of its experts
        (raises :class:`ExpertUnavailable` when an expert has none left)."""
        ni, row_ids, ids, weights = part
        self.failovers += 1
        log.warning("re-sending layer %d micro-batch %d rows owed by expert node %s to other "
                    "replicas", pending.layer, pending.micro_batch,
                    self.placement.nodes[ni].node_id)
        self._send(pending, row_ids, self._routes.split(ids, weights, self._offset(pending),
                                                        partial=True))

    @staticmethod
    def _offset(pending: PendingCombine) -> int:
        """Rotates the replica choice by step and layer (see routing)."""
        return pending.step + pending.layer

    def ready(self, pending: PendingCombine) -> bool:
        """True when every reply ``pending`` waits for has arrived (never blocks: replies
        already on the link are taken off it and kept for their combines)."""
        while (msg := self.reply_rx.poll()) is not None:
            self._keep(msg)
        return all(tag in self._arrived for tag in pending.waiting)

    def _forged(self, msg: libm2n.Message) -> bool:
        """True (and ``msg`` released, counted) for a reply to an outstanding tag that comes
        from another sender than the node the dispatch went to."""
        want = self._outstanding.get(msg.header.tag)
        if want is None or msg.header.sender_id == want:
            return False
        self.forged_replies += 1
        if self.forged_replies == 1 or self.forged_replies % 1000 == 0:
            log.warning("dropped %d reply(ies) from a sender that was not sent the dispatch "
                        "(latest: sender %d, expected %d)", self.forged_replies,
                        msg.header.sender_id, want)
        msg.release()
        return True

    def _keep(self, msg: libm2n.Message) -> None:
        """Hold a reply until its combine takes it (a late one is dropped)."""
        tag = msg.header.tag
        if self._forged(msg):
            return
        if tag in self._outstanding:
            self._arrived[tag] = msg
        else:  # late reply of a re-sent part or of a failed step
            self.dropped_replies += 1
            msg.release()

    def combine(self, pending: PendingCombine, dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
        """Wait for every reply of ``pending``; returns the summed expert output [T, H].

        Parts owed by a node that goes down meanwhile are re-sent (module docstring); each
        round of re-sending gets a fresh ``reply_timeout_s``."""
        out: torch.Tensor | None = None
        deadline = time.monotonic() + self.reply_timeout_s
        while pending.waiting:
            self._fail_over(pending)
            msg = self._next_reply(pending, deadline)
            if msg is None:  # nodes were marked down: re-send their parts, wait afresh
                deadline = time.monotonic() + self.reply_timeout_s
                continue
            ni, row_ids, _, _ = pending.waiting.pop(msg.header.tag)
            self._outstanding.pop(msg.header.tag, None)
            with msg:
                part = msg.tensor()
                if moe_wire.is_error(part):
                    text = moe_wire.error_text(part)
                    why = (f"expert node {self.placement.nodes[ni].node_id} refused layer "
                           f"{pending.layer}: {text}")
                    if text.startswith(moe_wire.STALE_EPOCH):
                        raise StalePlacement(why, self.placement.epoch)
                    raise ExpertUnavailable(why)
                want = pending.num_tokens if row_ids is None else row_ids.numel()
                if tuple(part.shape) != (want, self.hidden):
                    raise ExpertUnavailable(
                        f"expert node {self.placement.nodes[ni].node_id} replied with shape "
                        f"{tuple(part.shape)}, expected ({want}, {self.hidden})")
                if out is None and row_ids is None:
                    # The usual case, one node serving every row: one copy out of the slot
                    # (released below) instead of zero-filling and adding.
                    out = part.to(device=device, dtype=dtype, copy=True)
                else:
                    if out is None:
                        out = torch.zeros(pending.num_tokens, self.hidden, dtype=dtype,
                                          device=device)
                    part = part.to(device=device, dtype=dtype)
                    if row_ids is None:
                        out.add_(part)
                    else:
                        out.index_add_(0, row_ids.to(device), part)
        self._round_trips.append(time.perf_counter() - pending.sent_at)
        if out is None:  # nothing was owed (no rows)
            out = torch.zeros(pending.num_tokens, self.hidden, dtype=dtype, device=device)
        return out

    def _fail_over(self, pending: PendingCombine) -> None:
        """Re-send the parts of ``pending`` owed by nodes marked down (a reply that already
        arrived from such a node is still used)."""
        if not self.down:
            return
        down = self._routes.down
        for tag in [t for t, p in pending.waiting.items() if p[0] in down]:
            if tag not in self._arrived:
                self._outstanding.pop(tag, None)
                self._resend(pending, pending.waiting.pop(tag))

    def _next_reply(self, pending: PendingCombine, deadline: float) -> libm2n.Message | None:
        """The next reply for ``pending``, or None once a node it waits on was marked down
        (link broken, or silent past ``deadline``)."""
        for tag in pending.waiting:
            if tag in self._arrived:
                return self._arrived.pop(tag)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                for ni in sorted({p[0] for p in pending.waiting.values()}):
                    self._mark_down(ni, f"no reply to layer {pending.layer} within "
                                        f"{self.reply_timeout_s:g} s")
                return None
            try:
                msg = self.reply_rx.recv(timeout=min(left, 0.5))
            except TimeoutError:
                if self._check_senders():
                    return None
                continue
            if msg.header.tag in pending.waiting:
                if not self._forged(msg):
                    return msg
                continue
            self._keep(msg)  # another micro-batch's (kept until combined), or a late one

    def _check_senders(self) -> bool:
        """Mark down every node whose link is known to be broken (instead of waiting the
        bound); True when one was newly marked."""
        before = len(self.down)
        for ni, s in enumerate(self._senders):
            try:
                s.check()
            except libm2n.M2NError as exc:
                self._mark_down(ni, f"link lost: {exc}")
        return len(self.down) > before

    def take_round_trips(self) -> list[float]:
        """Round-trip times recorded since the last call (then forgotten)."""
        out, self._round_trips = self._round_trips, []
        return out

    def discard(self, pending: PendingCombine) -> None:
        """Abandon a dispatch (its lane step failed): replies already kept for it are
        released, replies still in flight are dropped when they arrive."""
        for tag in pending.waiting:
            msg = self._arrived.pop(tag, None)
            if msg is not None:
                msg.release()
            self._outstanding.pop(tag, None)
        pending.waiting.clear()

    def close(self) -> None:
        for msg in self._arrived.values():
            msg.release()
        self._arrived.clear()
        self._outstanding.clear()
        for s in self._senders:
            s.close()
        self._senders = []
