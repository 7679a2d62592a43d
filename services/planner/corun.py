"""The profiled work of each pipeline side, and a co-running process for timing it under load.

In a served ping-pong with ``m >= 2`` the attention replica and the expert node compute at the
same time; on one host they share the last-level cache and memory bandwidth, so each side runs
slower than alone (measured here: 5–20% per call). :class:`CoRunner` reproduces that while one
side is timed: a spawned process pinned to another CPU runs the *other* side's work on
micro-batches of the same size, in a loop, until told to stop.

The workloads are the engine's own calls (services/attention/pingpong.py, services/expert):
:func:`attention_pass` is what the replica counts as T_a (attention block, packing the
dispatch, adding the combine), :func:`expert_pass` one node's grouped-expert compute.
torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

BLOCK = 16  # KV block size used for profiling (the engine's default)


@dataclass
class DecodeBatch:
    """``b`` sequences at context ``seq_len`` decoding one token each: the attention side's
    inputs (tokens [b], their hidden [b, H], metadata, a paged KV cache holding the context,
    and the block tables the metadata was built from)."""

    tokens: Any
    hidden: Any
    meta: Any
    kv: Any
    tables: list[list[int]]
    seq_len: int


def decode_batch(attn: Any, b: int, seq_len: int) -> DecodeBatch:
    import torch

    from services.core.batch import build_batch_meta
    from services.core.kv_cache import BlockManager

    blocks = BlockManager(b * (seq_len // BLOCK + 2), BLOCK)
    kv = attn.new_kv_cache(blocks.num_blocks, BLOCK)
    for i in range(b):
        blocks.allocate(i, 0)
        blocks.append_slots(i, seq_len + 1)
    tables = [blocks.block_table(i) for i in range(b)]
    meta = build_batch_meta(tables, [seq_len] * b, [1] * b, BLOCK)
    tokens = torch.randint(0, attn.cfg.vocab_size, (b,))
    with torch.inference_mode():
        return DecodeBatch(tokens, attn.embed(tokens), meta, kv, tables, seq_len)


def attention_pass(attn: Any, layers: Sequence[int], batch: DecodeBatch) -> None:
    """T_a for every layer in ``layers``: attention block, dispatch packing, combine add."""
    import torch

    from services.core import moe_wire

    with torch.inference_mode():
        for layer in layers:
            mi = attn.attention_block(layer, batch.hidden, batch.meta, batch.kv)
            moe_wire.pack_dispatch(mi.normed, mi.topk_ids, mi.topk_weights)
            attn.finish_layer(mi, torch.zeros_like(batch.hidden).add_(mi.normed))


def step_pass(attn: Any, batch: DecodeBatch) -> None:
    """What a decode step does once, outside the layers: build the batch metadata and the token
    tensor, embed, final norm + LM head, greedy sampling."""
    import torch

    from services.core.batch import build_batch_meta
    from services.core.request import SamplingParams
    from services.core.sampling import sample

    b = len(batch.tables)
    greedy = SamplingParams(temperature=0.0)
    build_batch_meta(batch.tables, [batch.seq_len] * b, [1] * b, BLOCK)
    tokens = torch.tensor(batch.tokens.tolist(), dtype=torch.int64)
    with torch.inference_mode():
        logits = attn.logits(attn.embed(tokens), batch.meta.last_index)
        sample(logits, [greedy] * b, [None] * b, [0] * b, attn.cfg.eos_token_ids).tolist()


def expert_pass(experts: Any, layers: Sequence[int], rows: Any, ids: Any, weights: Any) -> None:
    """One expert node's compute over a micro-batch's routed rows, for every layer."""
    import torch

    with torch.inference_mode():
        for layer in layers:
            experts.forward(layer, rows, ids, weights)


def random_routing(cfg: Any, b: int) -> tuple[Any, Any, Any]:
    """rows [b, H], distinct top-k ids [b, K] and weights [b, K] with a uniform router."""
    import torch

    ids = torch.rand(b, cfg.num_experts).topk(cfg.top_k, dim=-1).indices
    return torch.randn(b, cfg.hidden_size), ids, torch.rand(b, cfg.top_k)


def spare_cpus() -> tuple[int, int] | None:
    """(CPU to time on, CPU for the co-runner), or None with fewer than two CPUs allowed."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the body on ``cpu`` only (this process), then restore the affinity."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _co_run(model_dir: str, side: str, seq_len: int, cpu: int, sizes: mp.Queue,
            ready: mp.Queue) -> None:
    """Child process: run ``side``'s work at the last size received until told None."""
    os.sched_setaffinity(0, {cpu})
    from services.core.config import ModelConfig
    from services.core.model import AttentionSide, ExpertSide
    from services.core.runtime import configure_threads

    configure_threads(1)
    cfg = ModelConfig.from_pretrained(model_dir)
    layers = [i for i, sparse in enumerate(cfg.sparse_layers) if sparse]
    if side == "attention":
        attn = AttentionSide.from_pretrained(model_dir, cfg=cfg)
    else:
        experts = ExpertSide.from_pretrained(model_dir, cfg=cfg)
    work = None
    while True:
        try:
            b = sizes.get(block=work is None)
        except queue.Empty:
            b = 0  # keep going at the current size
        if b is None:
            return
        if b:
            if side == "attention":
                batch = decode_batch(attn, b, seq_len)
                work = lambda batch=batch: attention_pass(attn, layers, batch)  # noqa: E731
            else:
                routed = random_routing(cfg, b)
                work = lambda routed=routed: expert_pass(experts, layers, *routed)  # noqa: E731
            work()  # warm at the new size before the timed side starts
            ready.put(b)
        work()


class CoRunner:
    """A spawned process running one side's work on ``cpu`` (module docstring); use as a
    context manager and call :meth:`set_batch` before each timing."""

    def __init__(self, model_dir: str, side: str, seq_len: int, cpu: int,
                 start_timeout_s: float = 120.0) -> None:
        if side not in ("attention", "experts"):
            raise ValueError(f"side must be 'attention' or 'experts', got {side!r}")
        ctx = mp.get_context("spawn")  # a clean interpreter: no forked torch thread pools
        self._sizes: mp.Queue = ctx.Queue()
        self._ready: mp.Queue = ctx.Queue()
        self._timeout = start_timeout_s
        self._proc = ctx.Process(target=_co_run, args=(model_dir, side, seq_len, cpu,
                                                       self._sizes, self._ready), daemon=True)

    def set_batch(self, b: int) -> None:
        """Switch the co-runner to micro-batches of ``b`` and wait until it runs them."""
        self._sizes.put(b)
        try:
            got = self._ready.get(timeout=self._timeout)
        except queue.Empty:
            raise RuntimeError(f"co-running process did not start batch {b} within "
                               f"{self._timeout:g} s (exit code {self._proc.exitcode})") from None
        if got != b:
            raise RuntimeError(f"co-running process answered batch {got}, expected {b}")

    def __enter__(self) -> CoRunner:
        self._proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sizes.put(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
