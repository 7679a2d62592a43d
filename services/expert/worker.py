"""The expert node's drain loop: receive dispatches from any sender, compute, reply to each.

Asynchronous by design (docs/ARCHITECTURE.md §4 step 3): the loop takes whatever messages have
arrived — any attention replica, any layer, any micro-batch — groups their rows by layer, runs
each layer's rows through :meth:`ExpertSide.forward` once (which groups them by expert: one
GEMM per expert), and sends one combine reply per dispatch. There is no barrier across senders,
and replies are queued without waiting, so a slow or dead attention replica never stalls the
others.

A dispatch that cannot be served (bad layout, a layer that is not sparse, an expert this node does
not host, a stale placement epoch) gets an error reply (:mod:`services.core.moe_wire`) and the loop
goes on; so does every dispatch of a layer whose compute raised. Frames that are malformed at the
transport level are refused by libm2n itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from opentelemetry import trace
from opentelemetry.trace import Link

import libm2n
from services.common import tracing
from services.core import moe_wire
from services.core.model import ExpertSide

log = logging.getLogger("megascale.expert.worker")

MAX_DRAIN = 64  # messages taken per round; bounds one round's latency
MAX_DEFERRED = 64  # computes whose bookkeeping may wait for an idle moment (bounds staleness)


@dataclass(frozen=True)
class ComputeEvent:
    """One layer's expert compute over the rows drained in one round."""

    experts: list[int]
    rows_per_expert: list[int]
    start: float       # time.perf_counter() (CLOCK_MONOTONIC, comparable across processes)
    seconds: float
    rows: int
    layer: int


@dataclass
class WorkerStats:
    """Counters exported as metrics and through Expert.GetStats."""

    messages: int = 0
    refused: int = 0
    rows_by_expert: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    compute_s: float = 0.0
    groups: int = 0
    group_rows: int = 0
    started: float = field(default_factory=time.monotonic)


def _compute_span(layer: int, headers: list, rows: int):  # noqa: ANN202 - OpenTelemetry span
    """A span for one layer's compute, parented by the first traced dispatch and linked to the
    other dispatches' contexts (a compute group serves rows of several requests)."""
    contexts = [tracing.context_from_ids(h.trace_id, h.span_id) for h in headers]
    traced = [c for c in contexts if c is not None]
    links = [Link(trace.get_current_span(c).get_span_context()) for c in traced[1:]]
    return tracing.tracer(__name__).start_span(
        "expert.compute", traced[0] if traced else None, links=links,
        attributes={"megascale.layer": layer, "megascale.rows": rows,
                    "megascale.messages": len(headers)})


@dataclass(frozen=True)
class _Hosting:
    """The experts a node serves, swapped whole (an elastic node loads new sets)."""

    experts: ExpertSide
    hosted: frozenset[int]
    foreign: torch.Tensor | None  # [E] True for experts hosted elsewhere; None: none are

    @classmethod
    def of(cls, experts: ExpertSide) -> _Hosting:
        hosted = frozenset(experts.expert_ids)
        foreign = torch.ones(experts.cfg.num_experts, dtype=torch.bool)
        foreign[list(hosted)] = False
        return cls(experts, hosted, foreign if bool(foreign.any()) else None)


class SenderIdTaken(Exception):
    """An Attach named the sender id of a live replica with another reply URL."""


class ExpertWorker:
    """Owns the dispatch receiver and one reply sender per attached attention replica."""

    def __init__(self, experts: ExpertSide, rx: libm2n.Receiver, m2n_sender_id: int,
                 epoch: int = 0, peer_timeout_s: float = 10.0,
                 on_compute: Callable[[ComputeEvent], None] | None = None,
                 auth_token: bytes | None = None) -> None:
        self.cfg = experts.cfg
        self.rx = rx
        self.m2n_sender_id = m2n_sender_id
        self.epoch = epoch
        self.peer_timeout_s = peer_timeout_s
        self.auth_token = auth_token  # the cluster token its reply links present
        self._hosting = _Hosting.of(experts)
        self.sparse_layers = frozenset(i for i, s in enumerate(self.cfg.sparse_layers) if s)
        self.stats = WorkerStats()
        self.on_compute = on_compute
        self._replies: dict[int, libm2n.Sender] = {}
        self._lock = threading.Lock()
        self._inflight = 0
        # (ids, start, seconds, rows, layer) per compute whose _count waits for an idle moment
        self._deferred: list[tuple[torch.Tensor, float, float, int, int]] = []

    # ------------------------------------------------------------------ control
    @property
    def experts(self) -> ExpertSide:
        return self._hosting.experts

    @property
    def hosted(self) -> frozenset[int]:
        """The expert ids served now."""
        return self._hosting.hosted

    def set_experts(self, experts: ExpertSide) -> None:
        """Serve ``experts`` from the next drain round on (an elastic node's new set; any
        thread). A round in progress finishes with the set it started with."""
        self._hosting = _Hosting.of(experts)

    def attach(self, sender_id: int, reply_url: str) -> None:
        """Connect the reply link to an attention replica (idempotent per sender id).

        Raises :class:`SenderIdTaken` when ``sender_id`` has a live reply link to another
        URL: an Attach must not steal a live replica's replies. A replica that restarted on a
        new address is attached once its old link has failed (the drain loop drops it)."""
        with self._lock:
            live = self._replies.get(sender_id)
        # (the link's own check, outside our lock: the drain loop's callbacks take it)
        if live is not None and live.url != reply_url and live.healthy():
            raise SenderIdTaken(f"m2n sender id {sender_id} is attached to a live replica "
                                f"at {live.url}; refusing a second one at {reply_url}")
        with self._lock:
            same = self._replies.get(sender_id)
            if same is not None and same.url == reply_url:
                # The same receiver would refuse a second link with our sender id while the
                # first is open: close it first (a reply in between fails like a lost link).
                del self._replies[sender_id]
            else:
                same = None
        if same is not None:
            same.close()
        sender = libm2n.connect(reply_url, libm2n.SenderConfig(
            sender_id=self.m2n_sender_id, epoch=self.epoch, peer_timeout_s=self.peer_timeout_s,
            auth_token=self.auth_token))
        with self._lock:
            old = self._replies.pop(sender_id, None)
            self._replies[sender_id] = sender
        if old is not None:
            old.close()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def inflight(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            first = self.rx.poll()
            if first is None:
                # Idle: settle the bookkeeping deferred while dispatches were queued, then block.
                self._settle()
                try:
                    first = self.rx.recv(timeout=0.1)
                except TimeoutError:
                    continue
            batch = [first]
            while len(batch) < MAX_DRAIN and (msg := self.rx.poll()) is not None:
                batch.append(msg)
            self._inflight = len(batch)
            try:
                self.process(batch)
            except Exception:  # never let one bad round kill the node
                log.exception("expert round failed")
            finally:
                self._inflight = 0

    @torch.inference_mode()
    def process(self, msgs: list[libm2n.Message]) -> None:
        """Validate, group by layer, compute, reply; releases every message."""
        by_layer: dict[int, list[tuple[libm2n.Message, torch.Tensor, torch.Tensor,
                                       torch.Tensor]]] = defaultdict(list)
        hosting = self._hosting  # one set of experts for the whole round (set_experts)
        for msg in msgs:
            self.stats.messages += 1
            try:
                rows, ids, weights = self._validate(msg, hosting)
            except ValueError as exc:
                self.stats.refused += 1
                self._reply_to(msg.header, moe_wire.pack_error(str(exc)))
                msg.release()
                continue
            by_layer[msg.header.layer].append((msg, rows, ids, weights))

        device = hosting.experts.device
        for layer, items in by_layer.items():
            msgs_here = [m for m, _, _, _ in items]
            headers = [m.header for m in msgs_here]
            if len(items) == 1 and device.type == "cpu":
                # One dispatch (the common case: one replica, or lanes apart in time): compute
                # straight from its slot and release it after the compute, saving a copy of
                # every row. Its lane sends nothing before this reply anyway; the sender's other
                # lanes use its other slots (slots_per_sender, default 8). The grouped FFN
                # gathers the rows it needs, so the strided slot view costs nothing extra.
                _, rows, ids, weights = items[0]
                sizes = [rows.shape[0]]
            else:
                # One forward per layer over every sender's rows: torch.cat copies out of the
                # slots, so the dispatches are released (credits returned) before the compute.
                rows = torch.cat([r for _, r, _, _ in items]).to(device)
                ids = torch.cat([i for _, _, i, _ in items]).to(device)
                weights = torch.cat([w for _, _, _, w in items]).to(device)
                sizes = [r.shape[0] for _, r, _, _ in items]
                for m in msgs_here:
                    m.release()
            span = _compute_span(layer, headers, rows.shape[0]) if tracing.enabled() else None
            # Rows travel in the compute dtype and gate weights as float32 (moe_wire): the
            # router's very values, whether it kept them in float32 or rounded them.
            try:
                t0 = time.perf_counter()
                out = hosting.experts.forward(layer, rows, ids, weights)
                # the reply leaves from host memory: this copy waits for the GPU's compute
                out = out.cpu()
                dt = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - fail these dispatches, keep serving
                # Answer each sender at once: a silent node would be waited on for the
                # replica's whole expert timeout and then marked down.
                log.exception("expert compute failed on layer %d", layer)
                self.stats.refused += len(headers)
                error = moe_wire.pack_error(f"expert compute failed on layer {layer}: "
                                            f"{type(exc).__name__}: {exc}")
                for h in headers:
                    self._reply_to(h, error)
                continue
            finally:
                for m in msgs_here:
                    m.release()  # idempotent: the copied-out case released them above
                if span is not None:
                    span.end()
            # Reply first: the senders wait on it. The bookkeeping waits for an idle moment
            # (run() settles it before blocking), or it would delay the next queued dispatch.
            for h, part in zip(headers, out.split(sizes), strict=True):
                self._reply_to(h, part.contiguous())
            self._deferred.append((ids, t0, dt, rows.shape[0], layer))
            if len(self._deferred) >= MAX_DEFERRED:
                self._settle()

    # ------------------------------------------------------------------ helpers
    def _validate(self, msg: libm2n.Message, hosting: _Hosting
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = msg.header
        # One epoch of grace: replicas switch placement at their next step boundary, so
        # dispatches of the previous epoch are still in flight for a moment. Older ones are
        # stale (their sender routes by a table this node may no longer match).
        if h.epoch + 1 < self.epoch:
            raise ValueError(f"{moe_wire.STALE_EPOCH}: the dispatch carries epoch {h.epoch}, "
                             f"the node is at epoch {self.epoch}")
        if h.layer not in self.sparse_layers:
            raise ValueError(f"layer {h.layer} is not a sparse layer of this model")
        rows, ids, weights = moe_wire.unpack_dispatch(msg.tensor(), self.cfg.hidden_size,
                                                      self.cfg.top_k, self.cfg.num_experts,
                                                      hosting.experts.dtype)
        if hosting.foreign is not None:  # some experts live elsewhere: refuse rows for them
            bad = hosting.foreign[ids.clamp(min=0)] & (ids >= 0)
            if bool(bad.any()):
                foreign = sorted(set(ids[bad].tolist()))
                raise ValueError(f"experts {foreign} are not hosted on this node")
        return rows, ids, weights

    def _settle(self) -> None:
        """Apply the deferred per-compute bookkeeping (counters, metrics, timeline)."""
        pending, self._deferred = self._deferred, []
        for args in pending:
            self._count(*args)

    def _count(self, ids: torch.Tensor, start: float, seconds: float, nrows: int,
               layer: int) -> None:
        s = self.stats
        s.compute_s += seconds
        per_expert = torch.bincount(ids[ids >= 0], minlength=self.cfg.num_experts).tolist()
        experts = [e for e, c in enumerate(per_expert) if c]
        counts = [per_expert[e] for e in experts]
        for e, c in zip(experts, counts, strict=True):
            s.rows_by_expert[e] += c
        s.groups += len(experts)
        s.group_rows += sum(counts)
        if self.on_compute is not None:
            self.on_compute(ComputeEvent(experts, counts, start, seconds, nrows, layer))

    def _reply_to(self, h, payload: torch.Tensor) -> None:  # noqa: ANN001 - libm2n Header
        with self._lock:
            sender = self._replies.get(h.sender_id)
        if sender is None:
            log.warning("dispatch from unattached sender %d dropped", h.sender_id)
            self.stats.refused += 1
            return
        try:
            fut = sender.send(payload, step=h.step, layer=h.layer, micro_batch=h.micro_batch,
                              tag=h.tag)
        except libm2n.M2NError as exc:
            self._drop(h.sender_id, sender, exc)
            return
        # The payload must outlive the send; the future keeps nothing, so hold it until done.
        fut.add_done_callback(lambda f, _keep=payload: self._sent(h.sender_id, sender, f))

    def _sent(self, sender_id: int, sender: libm2n.Sender, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None:
            self._drop(sender_id, sender, exc)

    def _drop(self, sender_id: int, sender: libm2n.Sender, exc: BaseException) -> None:
        with self._lock:
            if self._replies.get(sender_id) is not sender:
                return
            del self._replies[sender_id]
        log.warning("attention replica %d is gone (%s); dropping its reply link", sender_id, exc)
        threading.Thread(target=sender.close, daemon=True).start()

    def close(self) -> None:
        with self._lock:
            senders = list(self._replies.values())
            self._replies.clear()
        for s in senders:
            s.close()
