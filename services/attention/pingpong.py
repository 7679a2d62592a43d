"""The ping-pong micro-batch pipeline of one engine step (MegaScale-Infer §4).

A step's batch is split into ``m`` micro-batches. For every layer, for every micro-batch: take
the previous layer's combine for that micro-batch, run attention + router, dispatch the routed
rows to the expert nodes, and move straight on to the next micro-batch. While micro-batch ``i``
is at the experts, attention computes micro-batch ``i + 1``; with ``T_a ≈ T_e`` and enough
micro-batches (``m >= 2 (1 + T_c / T_f)``) neither side idles.

Timeline for m = 2 (A = attention, E = experts, layer l)::

    A: [a0 l][a1 l]      [a0 l+1][a1 l+1] ...
    E:       [e0 l][e1 l]       [e0 l+1] ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from services.attention.dispatch import ExpertClient, PendingCombine
from services.attention.scheduler import ScheduledChunk
from services.core.batch import BatchMeta, build_batch_meta
from services.core.kv_cache import BlockManager, PagedKVCache
from services.core.model import AttentionSide, MoEInput


@dataclass(frozen=True)
class MicroBatch:
    """A contiguous group of scheduled chunks run as one attention batch."""

    chunks: tuple[ScheduledChunk, ...]
    token_ids: torch.Tensor   # [T] int64, the chunks' tokens end to end
    meta: BatchMeta

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def trace(self) -> tuple[bytes, bytes] | None:
        """Trace context its dispatches carry: the first traced request's (see tracing.py)."""
        return next((c.request.trace for c in self.chunks if c.request.trace), None)


def split_chunks(chunks: tuple[ScheduledChunk, ...], m: int) -> list[tuple[ScheduledChunk, ...]]:
    """Split into at most ``m`` contiguous groups with near-equal token counts (a chunk is
    never split; fewer groups when there are fewer chunks than ``m``)."""
    m = max(1, min(m, len(chunks)))
    total = sum(c.num_tokens for c in chunks)
    groups: list[tuple[ScheduledChunk, ...]] = []
    start, acc = 0, 0
    for i, c in enumerate(chunks):
        acc += c.num_tokens
        left_chunks = len(chunks) - (i + 1)
        left_groups = m - len(groups) - 1
        # close the group once it reaches its share, keeping one chunk per remaining group
        if left_groups > 0 and (acc * m >= total * (len(groups) + 1) or left_chunks == left_groups):
            groups.append(chunks[start: i + 1])
            start = i + 1
    groups.append(chunks[start:])
    return [g for g in groups if g]


def build_micro_batches(chunks: tuple[ScheduledChunk, ...], m: int, blocks: BlockManager,
                        device: torch.device, sliding_window: int | None) -> list[MicroBatch]:
    """Turn a step plan's chunks into micro-batches with their attention metadata."""
    out = []
    for group in split_chunks(chunks, m):
        ids = [c.request.request_id for c in group]
        meta = build_batch_meta([blocks.block_table(i) for i in ids], [c.start for c in group],
                                [c.num_tokens for c in group], blocks.block_size, device,
                                sliding_window)
        tokens = torch.tensor([t for c in group for t in c.token_ids], dtype=torch.int64,
                              device=device)
        out.append(MicroBatch(tuple(group), tokens, meta))
    return out


@dataclass
class StepTimings:
    """Where one step's wall time went (seconds)."""

    start: float = 0.0         # time.perf_counter() at the step start (CLOCK_MONOTONIC: the
                               # same clock in every process of a host, for timelines)
    wall_s: float = 0.0
    attention_s: float = 0.0   # attention + router + embed + head compute (T_a summed)
    wait_s: float = 0.0        # blocked waiting for combines (experts or links busy)
    round_trips: list[float] = field(default_factory=list)  # per dispatch: sent -> combined
    intervals: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    # (kind "attn"|"wait", layer, micro-batch, start, end) relative to the step start, only
    # recorded when asked for (bench timeline)


class PingPongRunner:
    """Runs one step's micro-batches through every layer (module docstring)."""

    def __init__(self, attention: AttentionSide, kv: PagedKVCache, client: ExpertClient,
                 record_intervals: bool = False) -> None:
        self.attention = attention
        self.kv = kv
        self.client = client
        self.record_intervals = record_intervals

    @torch.inference_mode()
    def run(self, step: int, mbs: list[MicroBatch]) -> tuple[list[torch.Tensor], StepTimings]:
        """Returns logits ``[B_i, V]`` per micro-batch (one row per chunk) and timings."""
        attn, client, kv = self.attention, self.client, self.kv
        t0 = time.perf_counter()
        t = StepTimings(start=t0)
        record = self.record_intervals

        def mark(kind: str, layer: int, i: int, start: float) -> float:
            end = time.perf_counter()
            if kind == "attn":
                t.attention_s += end - start
            else:
                t.wait_s += end - start
            if record:
                t.intervals.append((kind, layer, i, start - t0, end - t0))
            return end

        n = len(mbs)
        hidden = [attn.embed(mb.token_ids) for mb in mbs]
        moe: list[MoEInput | None] = [None] * n
        pending: list[PendingCombine | None] = [None] * n
        mark("attn", -1, -1, t0)

        def take_combine(i: int, layer: int) -> None:
            s = time.perf_counter()
            out = client.combine(pending[i], hidden[i].dtype, hidden[i].device)
            s = mark("wait", layer, i, s)
            hidden[i] = attn.finish_layer(moe[i], out)
            mark("attn", layer, i, s)
            pending[i] = None

        try:
            for layer in range(attn.cfg.num_layers):
                for i, mb in enumerate(mbs):
                    if pending[i] is not None:
                        take_combine(i, layer - 1)
                    s = time.perf_counter()
                    mi = attn.attention_block(layer, hidden[i], mb.meta, kv)
                    if mi.routed:
                        moe[i] = mi
                        pending[i] = client.dispatch(step, mi, i, mb.trace)
                    else:
                        hidden[i] = attn.finish_layer(mi, None)
                    mark("attn", layer, i, s)
            for i in range(n):
                if pending[i] is not None:
                    take_combine(i, attn.cfg.num_layers - 1)
            s = time.perf_counter()
            logits = [attn.logits(hidden[i], mb.meta.last_index) for i, mb in enumerate(mbs)]
            mark("attn", attn.cfg.num_layers, -1, s)
        except BaseException:
            client.discard_pending()
            raise
        t.wall_s = time.perf_counter() - t0
        t.round_trips = client.take_round_trips()
        return logits, t
