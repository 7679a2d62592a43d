"""The ping-pong micro-batch pipeline (MegaScale-Infer §4), run as ``m`` lanes.

The replica's running requests are split into ``m`` *lanes*; each lane is one micro-batch that
steps on its own (the batcher plans per lane, services/attention/batching.py). The engine
goes round the lanes; at each turn a lane takes the combine of its previous layer, runs
attention + router for its next layer and dispatches the routed rows to the expert nodes, and
the engine moves straight on to the next lane. While lane ``i`` is at the experts, attention
computes lane ``i + 1``; with ``T_a ≈ T_e`` and enough lanes (``m >= 2 (1 + T_c / T_f)``)
neither side idles.

Because lanes step independently, the pipeline does not drain at a step boundary: when lane 0
finishes its last layer it samples, is rescheduled and dispatches its next step's first layer
while lane 1's last layer is still at the experts. (A step-synchronous pipeline, where all
micro-batches of a step finish before the next step starts, leaves the attention side idle for
the last micro-batch's expert call and the expert side idle for the first micro-batch's
attention, once per step.)

Timeline for m = 2 (A = attention, E = experts, lane/layer; L = last layer)::

    A: [0/L-1][1/L-1]    [0/L, sample, 0/0 of the next step][1/L, sample, 1/0] ...
    E:        [0/L-1][1/L-1]      [0/L]   [1/L]                  [0/0]      ...
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.attention.batching import ScheduledChunk, StepPlan
from services.attention.dispatch import ExpertClient, PendingCombine
from services.attention.local_experts import LocalExperts
from services.core.batch import BatchMeta, build_batch_meta, int64_tensor
from services.core.kv_cache import BlockManager, PagedKVCache
from services.core.model import AttentionSide, MoEInput


@dataclass(frozen=True)
class MicroBatch:
    """A lane's step: its scheduled chunks run as one attention batch."""

    chunks: tuple[ScheduledChunk, ...]
    token_ids: torch.Tensor   # [T] int64, the chunks' tokens end to end
    meta: BatchMeta
    trace: tuple[bytes, bytes] | None = None  # what its dispatches carry (see tracing.py)


def build_micro_batch(chunks: tuple[ScheduledChunk, ...], blocks: BlockManager,
                      device: torch.device, sliding_window: int | None) -> MicroBatch:
    """Turn a lane's step plan into a micro-batch with its attention metadata."""
    ids = [c.request.request_id for c in chunks]
    meta = build_batch_meta([blocks.block_table(i) for i in ids], [c.start for c in chunks],
                            [c.num_tokens for c in chunks], blocks.block_size, device,
                            sliding_window)
    flat: list[int] = []
    for c in chunks:
        if c.num_tokens == 1:  # a decode token (the hot case): no slice list per request
            flat.append(c.request.token_at(c.start))
        else:
            flat += c.token_ids
    tokens = int64_tensor(flat, device)
    # the first traced request's context stands for the micro-batch
    trace = next((c.request.trace for c in chunks if c.request.trace), None)
    return MicroBatch(chunks, tokens, meta, trace)


@dataclass
class StepTimings:
    """Where one lane step's wall time went (seconds). Lanes overlap in time: the replica's
    busy time is the sum of ``attention_s`` over lane steps, not of ``wall_s``."""

    start: float = 0.0         # time.perf_counter() at the step start (CLOCK_MONOTONIC: the
                               # same clock in every process of a host, for timelines)
    lane: int = 0
    wall_s: float = 0.0
    attention_s: float = 0.0   # attention + router + embed + head compute (T_a summed)
    wait_s: float = 0.0        # blocked waiting for combines (experts or links busy)
    round_trips: list[float] = field(default_factory=list)  # per dispatch: sent -> combined
    intervals: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    # (kind "attn"|"wait", layer, lane, start, end) relative to the step start, only
    # recorded when asked for (bench timeline)


@dataclass(eq=False)
class LaneStep:
    """One lane's step in flight: how far through the layers its micro-batch is."""

    step: int                 # engine-wide step number (dispatch headers, replica rotation)
    lane: int
    plan: StepPlan
    mb: MicroBatch
    timings: StepTimings
    hidden: torch.Tensor      # [T, H] input of layer ``layer`` (residual stream)
    layer: int = 0            # the next layer whose attention runs
    moe: MoEInput | None = None
    pending: PendingCombine | None = None  # the dispatch of layer ``layer - 1``


class PingPongRunner:
    """Moves lane steps through the layers, one dispatch at a time (module docstring)."""

    def __init__(self, attention: AttentionSide, kv: PagedKVCache,
                 client: ExpertClient | LocalExperts,
                 record_intervals: bool = False) -> None:
        self.attention = attention
        self.kv = kv
        self.client = client
        self.record_intervals = record_intervals
        # Called when a combine is not there yet and the runner is about to block on it: the
        # engine delivers deferred work then (services/attention/engine.py).
        self.on_wait: Callable[[], None] | None = None

    def _mark(self, t: StepTimings, kind: str, layer: int, start: float) -> float:
        end = time.perf_counter()
        if kind == "attn":
            t.attention_s += end - start
        else:
            t.wait_s += end - start
        if self.record_intervals:
            t.intervals.append((kind, layer, t.lane, start - t.start, end - t.start))
        return end

    @torch.inference_mode()
    def start(self, step: int, lane: int, plan: StepPlan, mb: MicroBatch) -> LaneStep:
        """Embed the micro-batch's tokens; :meth:`advance` then runs its layers."""
        t0 = time.perf_counter()
        t = StepTimings(start=t0, lane=lane)
        ls = LaneStep(step, lane, plan, mb, t, self.attention.embed(mb.token_ids))
        self._mark(t, "attn", -1, t0)
        return ls

    @torch.inference_mode()
    def advance(self, ls: LaneStep) -> torch.Tensor | None:
        """Take the lane's pending combine (blocking), then run attention layer by layer until
        the next routed layer is dispatched (None) or the last layer is done: then the
        logits ``[B, V]`` of its micro-batch (one row per chunk). Raises what the combine or a
        layer raises; :meth:`abandon` the step then."""
        attn, client, t = self.attention, self.client, ls.timings
        mb, lane = ls.mb, ls.lane
        if ls.pending is not None:
            if self.on_wait is not None and not client.ready(ls.pending):
                self.on_wait()
            s = time.perf_counter()
            out = client.combine(ls.pending, ls.hidden.dtype, ls.hidden.device)
            s = self._mark(t, "wait", ls.layer - 1, s)
            ls.hidden = attn.finish_layer(ls.moe, out)
            ls.pending = ls.moe = None
            self._mark(t, "attn", ls.layer - 1, s)
        while ls.layer < attn.cfg.num_layers:
            s = time.perf_counter()
            mi = attn.attention_block(ls.layer, ls.hidden, mb.meta, self.kv)
            ls.layer += 1
            if mi.routed:
                ls.pending = client.dispatch(ls.step, mi, lane, mb.trace)
                # shared experts (DeepSeek) run here while the routed rows are at the experts
                ls.moe = attn.shared_experts(mi)
                self._mark(t, "attn", ls.layer - 1, s)
                return None
            ls.hidden = attn.finish_layer(mi, None)
            self._mark(t, "attn", ls.layer - 1, s)
        s = time.perf_counter()
        logits = attn.logits(ls.hidden, mb.meta.last_index)
        self._mark(t, "attn", attn.cfg.num_layers, s)
        t.wall_s = time.perf_counter() - t.start
        t.round_trips = client.take_round_trips()
        return logits

    def abandon(self, ls: LaneStep) -> None:
        """Forget a failed lane step's dispatch (its replies are dropped when they come)."""
        if ls.pending is not None:
            self.client.discard(ls.pending)
            ls.pending = None
