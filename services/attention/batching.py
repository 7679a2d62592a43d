"""Continuous batching for one attention replica over a paged KV pool (vLLM's "scheduler";
named the batcher here, so that "scheduler" means only the control-plane service).

Every engine step the batcher decides which requests run and how many of their tokens:

1. Running requests first, in arrival order: a decoding request gets 1 token, a request still
   prefilling gets its next chunk. If the KV pool cannot hold a request's new tokens, the
   most recently arrived running request is **preempted** (its blocks are freed; it goes back to
   the front of the waiting queue and later recomputes its prompt + output so far).
2. Then waiting requests are admitted in arrival order while the step's token budget
   (``max_batch_tokens``), the running-request cap (``max_num_seqs``) and free blocks allow;
   a long prompt is prefilled in chunks across steps (chunked prefill mixed with decode).

**Lanes.** The ping-pong engine keeps ``m`` micro-batches in flight as *lanes* that step
independently (services/attention/pingpong.py). A request joins a lane when it is admitted and
stays in it; ``schedule(lane, lanes)`` plans one lane's next step over that lane's requests
only, with a ``1/lanes`` share of the token budget, of ``max_num_seqs`` and of the requests
present (so lanes fill evenly). When requests finish unevenly, a lane that is two or more
requests larger than the smallest hands its newest requests over to the smallest lanes when it
plans its step (it is between steps, so none of them is in flight; the taker only sees them in
its next step). Preemption picks the newest request *of the same lane*: the other lanes may be
mid-step, writing their blocks.

Nothing here touches tensors; the engine turns a :class:`StepPlan` into micro-batches.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from services.attention.prefix_cache import PrefixCachingBlockManager
from services.core.kv_cache import BlockManager
from services.core.prefix_hash import extend_chain
from services.core.request import FinishReason, SamplingParams
from services.errors import UserError


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request's mutable state inside the replica.

    ``output`` holds every generated token, including ``resumed`` ones given at submission (a
    request resumed after a replica failure); only tokens past those are streamed.
    ``num_computed`` counts tokens of ``prompt + output`` whose K/V is in the cache.
    """

    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float
    output: list[int] = field(default_factory=list)
    num_resumed: int = 0
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    first_scheduled: float | None = None
    trace: tuple[bytes, bytes] | None = None  # (trace id, span id) carried in M2N headers
    num_streamed: int = 0  # output tokens already sent to the client (resumed ones count)
    lane: int = 0  # the engine lane (micro-batch) it runs in, set at admission
    # chained hashes of its full blocks (prefix caching), extended as they are needed
    block_hashes: list[bytes] = field(default_factory=list)
    # per output token with params.logprobs (None for resumed ones); the grammar's matcher
    # (services/attention/sampler.py)
    logprobs: list = field(default_factory=list)
    grammar: object | None = None
    # with params.prompt_logprobs: entry p for prompt token p + 1; None once sent
    prompt_logprobs: list | None = None
    # (index, hash) of the full prompt blocks it is computing and has not committed yet
    # (prefix caching: a request that needs one of them waits for it, Batcher._admit_cached)
    computing: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_at(self, pos: int) -> int:
        """Token ``pos`` of ``prompt + output``."""
        p = len(self.prompt)
        return self.prompt[pos] if pos < p else self.output[pos - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of ``prompt + output``."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return self.output[start - p:end - p]
        return self.prompt[start:] + self.output[: end - p]


class ScheduledChunk(NamedTuple):
    """``num_tokens`` tokens of ``request`` starting at position ``start``.

    ``samples`` is True when the chunk ends at the request's last known token (fixed when the
    chunk is scheduled), so the step's logits at its last row produce the next token.
    (A NamedTuple: immutable like a frozen dataclass, and built in half the time; a step
    builds one per running request.)
    """

    request: Request
    start: int
    num_tokens: int
    samples: bool

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_slice(self.start, self.start + self.num_tokens)


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Request, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class BatchingConfig:
    """Limits of one replica's batching (validated at construction)."""

    max_num_seqs: int = 64          # running requests per step
    max_batch_tokens: int = 512     # tokens per step (prefill chunks + decode tokens)
    max_model_len: int = 4096       # prompt + output tokens of one request
    max_waiting: int = 1024         # queued requests beyond which submissions are refused

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batch_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry elsewhere."""


class Batcher:
    """Continuous batching with chunked prefill and preemption-by-recompute (module docstring)."""

    def __init__(self, blocks: BlockManager, config: BatchingConfig) -> None:
        self.blocks = blocks
        # prefix caching (services/attention/prefix_cache.py) when the pool supports it
        self.prefix = blocks if isinstance(blocks, PrefixCachingBlockManager) else None
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # hash of a full block a running request is computing -> that request (prefix
        # caching): a request whose next uncached block is one of them waits for it
        self._computing: dict[bytes, Request] = {}
        self.deferred_admissions = 0  # times a request was passed over for such a block
        self._by_id: dict[str, Request] = {}
        self.lane_moves = 0  # requests handed from a larger lane to a smaller one
        # finished requests by reason, counted here because every way out goes through
        # finish(), whether or not a client still listens
        self.finished_by_reason: Counter[FinishReason] = Counter()

    # ------------------------------------------------------------------ intake
    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise UserError when a request could never run on this replica."""
        total = prompt_len + params.max_tokens
        if total > self.config.max_model_len:
            raise UserError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) "
                            f"exceeds the model length {self.config.max_model_len}")
        need = self.blocks.blocks_needed(total)
        if need > self.blocks.num_blocks:
            raise UserError(f"request needs {need} KV blocks ({total} tokens) but the replica's "
                            f"KV pool has only {self.blocks.num_blocks} blocks")

    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise UserError(f"request_id {request.request_id!r} is already in use")
        # Resumed output tokens count toward max_tokens, so prompt + max_tokens bounds both.
        self.check_fits(len(request.prompt), request.params)
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark finished, free its KV blocks, forget it (finish, abort or error)."""
        if request.status is Status.FINISHED:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if request.request_id in self.blocks:
            if self.prefix is not None and reason is not FinishReason.ERROR:
                # its steps are over (an error may have cut one short: nothing to share)
                self._commit(request, request.num_computed)
            self._stop_computing(request)
            self.blocks.free(request.request_id)
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.finished_by_reason[reason] += 1
        del self._by_id[request.request_id]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the step
    def schedule(self, lane: int = 0, lanes: int = 1) -> StepPlan:
        """Plan lane ``lane``'s next step (of ``lanes``; one lane = the whole replica)."""
        if not 0 <= lane < lanes:
            raise ValueError(f"lane {lane} outside 0..{lanes - 1}")
        budget = -(-self.config.max_batch_tokens // lanes)
        # A lane holds its share of max_num_seqs, and no more than its share of the requests
        # there are, so a burst of arrivals is split evenly instead of filling lane 0 first
        # (a lane twice the size of the other keeps the expert side waiting on it).
        present = len(self.running) + len(self.waiting)
        seq_cap = min(-(-self.config.max_num_seqs // lanes),
                      present // lanes + (lane < present % lanes))
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        blocks = self.blocks
        mine = self._rebalance(lane, lanes)  # this lane's running requests, oldest first

        # 1. the lane's running requests, oldest first; preempt its newest when blocks run out.
        i = 0
        while i < len(mine) and budget > 0:
            req = mine[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not blocks.try_append(req.request_id, n):  # check and take in one
                victim = mine.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req itself was preempted: nothing newer is left in the lane
            chunks.append(self._take(req, n))
            budget -= n
            i += 1

        # 2. admit waiting requests in arrival order; one that can not get its blocks stops
        # admission (FCFS fairness); one waiting for a prompt block another request is
        # computing is passed over until that block is cached (then it shares it).
        pos = 0
        while (pos < len(self.waiting) and budget > 0 and not preempted
               and len(mine) < seq_cap and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[pos]
            if self.prefix is None:
                n = min(req.num_tokens - req.num_computed, budget)
                if not blocks.can_allocate(n):
                    break
                del self.waiting[pos]
                blocks.allocate(req.request_id, 0)
            else:
                admitted = self._admit_cached(req, pos, budget)
                if admitted is None:
                    pos += 1
                    continue
                if not admitted:
                    break
            n = min(req.num_tokens - req.num_computed, budget)
            req.status = Status.RUNNING
            req.lane = lane
            self.running.append(req)
            mine.append(req)
            blocks.append_slots(req.request_id, n)
            chunks.append(self._take(req, n))
            budget -= n
        return StepPlan(tuple(chunks), tuple(preempted))

    def _rebalance(self, lane: int, lanes: int) -> list[Request]:
        """Hand ``lane``'s newest running requests to the smallest lanes while ``lane`` is two
        or more larger (a lane twice the size of another keeps the experts waiting on it, and
        new arrivals alone refill the small lane only under steady load). Returns the lane's
        requests that stay, oldest first. Call only while ``lane`` is between steps."""
        mine = [r for r in self.running if r.lane == lane]
        if lanes == 1:
            return mine
        sizes = [0] * lanes
        for r in self.running:
            sizes[r.lane] += 1
        while True:
            small = min(range(lanes), key=sizes.__getitem__)
            if sizes[lane] - sizes[small] < 2:
                return mine
            mine.pop().lane = small
            self.lane_moves += 1
            sizes[lane] -= 1
            sizes[small] += 1

    def _admit_cached(self, req: Request, pos: int, budget: int) -> bool | None:
        """Take ``req`` (``waiting[pos]``) off the queue and give it its blocks, the cached
        prefix first (``num_computed`` = the prefix). False (nothing changed) if the pool is
        short; None (nothing changed) if its next prompt block is being computed by a running
        request: it is admitted once that block is cached, and shares it. This is how a
        request's ``n`` / ``best_of`` siblings (the gateway sends them to one replica) and a
        burst of requests with one system prompt compute the prompt's full blocks once."""
        p = self.prefix
        bs = p.block_size
        usable = (req.num_tokens - 1) // bs  # leave its last token to compute: the logits
        if req.prompt_logprobs is not None:  # owes prompt logprobs: every position computed
            usable = 0
        hashes = req.block_hashes
        if len(hashes) < usable:
            extend_chain(hashes, req.token_slice(len(hashes) * bs, usable * bs), bs)
        prefix = p.match(hashes, usable)
        nxt = len(prefix)
        if nxt < usable:
            owner = self._computing.get(hashes[nxt])
            if owner is not None and owner is not req:
                self.deferred_admissions += 1
                return None
        start = nxt * bs
        if not p.can_allocate(start + min(req.num_tokens - start, budget), prefix):
            return False
        del self.waiting[pos]
        p.allocate(req.request_id, 0, prefix)
        p.record_lookup(req.num_tokens, start)
        req.num_computed = start
        for i in range(nxt, usable):  # its prompt blocks others may wait for
            if hashes[i] not in self._computing:
                self._computing[hashes[i]] = req
                req.computing.append((i, hashes[i]))
        return True

    def _stop_computing(self, req: Request, below: int | None = None) -> None:
        """Forget ``req``'s claims on the blocks it computes (those before block ``below``:
        now committed, or all of them: it leaves the pool)."""
        keep = []
        for i, h in req.computing:
            if below is None or i < below:
                if self._computing.get(h) is req:
                    del self._computing[h]
            else:
                keep.append((i, h))
        req.computing = keep

    def _commit(self, req: Request, num_computed: int) -> None:
        """Register ``req``'s full blocks among its first ``num_computed`` tokens (K/V written)
        in the prefix cache."""
        p = self.prefix
        bs = p.block_size
        full = num_computed // bs
        if full <= p.committed(req.request_id):  # the hot case (decode inside a block)
            return
        hashes = req.block_hashes
        if len(hashes) < full:
            extend_chain(hashes, req.token_slice(len(hashes) * bs, full * bs), bs)
        p.commit(req.request_id, hashes, num_computed)
        if req.computing:
            self._stop_computing(req, full)

    def _take(self, req: Request, n: int) -> ScheduledChunk:
        """The chunk of ``req``'s next ``n`` tokens (their KV slots already appended)."""
        start = req.num_computed
        if self.prefix is not None:  # tokens before ``start`` were computed by earlier steps
            self._commit(req, start)
        req.num_computed = start + n
        return ScheduledChunk(req, start, n, start + n == req.num_tokens)

    def requeue(self, req: Request) -> None:
        """Put a running request back at the head of the queue, its KV freed: it resumes by
        recompute (its output so far kept), as a preempted one does. Call only while its
        lane is between steps."""
        if req.status is Status.RUNNING:
            self._preempt(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        if self.prefix is not None:  # between its steps: what it computed can be shared
            self._commit(req, req.num_computed)
        self._stop_computing(req)
        self.blocks.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
