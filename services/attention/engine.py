"""The attention replica's engine loop: per lane, schedule → micro-batch → layers (ping-pong
with the other lanes) → sample → emit.

The engine keeps ``micro_batches`` lanes in flight (services/attention/pingpong.py) and goes
round them: a lane takes its combine and runs on to its next dispatch; a lane that finishes
its step samples, emits, and starts its next step at once. So the pipeline never drains.

Threads: the engine runs in one dedicated thread (``run``); gRPC handlers call ``submit`` and
``abort`` from the server's event loop. Scheduler state is guarded by one lock that is **not**
held during the forward pass, so submissions and aborts never wait for a step. A running request
that is aborted mid-step is finished when its lane is between steps (its KV blocks cannot be
freed while a forward pass may still write them). A new expert placement is installed when no
lane is mid-step: lanes stop starting steps until the last one is done.

Per request the engine emits :class:`TokenEvent` objects to the listener given at submission:
one per sampled token, the last one carrying ``finish_reason``.

**Deferred delivery.** Events and step observers do not run where they arise. A lane's step
boundary (logits, sample, schedule, first dispatch) is on the expert nodes' critical path, and
handing a burst of events to the server's event loop there makes that thread compete for the
replica's core exactly then. So events queue in an outbox (in order, under the engine lock) and
are delivered when the engine is about to block on a combine anyway, at the latest one turn of
the lanes later, and at once when the engine goes idle or a handler thread finishes a request.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.attention.batching import (
    Batcher,
    BatchingConfig,
    Request,
    Status,
    StepPlan,
)
from services.attention.config import AttentionConfig
from services.attention.dispatch import ExpertClient
from services.attention.expert_pause import ExpertPause
from services.attention.local_experts import LocalExperts
from services.attention.pingpong import (
    LaneStep,
    PingPongRunner,
    StepTimings,
    build_micro_batch,
)
from services.attention.prefix_cache import PrefixCachingBlockManager
from services.attention.routing import ExpertUnavailable, Placement, StalePlacement
from services.attention.sampler import StepSampler
from services.core.kv_cache import BlockManager
from services.core.logits_processors import TokenLogprobs
from services.core.model import AttentionSide
from services.core.request import FinishReason, SamplingParams, check_request_id
from services.core.sampling import finish_reason, make_generator
from services.errors import UserError

log = logging.getLogger("megascale.attention.engine")


@dataclass(frozen=True)
class TokenEvent:
    """Output for one request: new tokens, and on the last event why it finished."""

    request_id: str
    token_ids: tuple[int, ...]
    index: int                        # position of token_ids[0] in the output (resumed counted)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None
    stop_token_id: int | None = None
    logprobs: tuple[TokenLogprobs | None, ...] | None = None  # per token, with params.logprobs
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # on the first event only
    # time.monotonic() when the engine emitted it (after sampling); the server measures the
    # deferred-delivery delay from here (megascale:token_delivery_delay_seconds)
    emitted: float = field(default_factory=time.monotonic, compare=False)


Listener = Callable[[TokenEvent], None]
StepObserver = Callable[[StepPlan, StepTimings], None]


class Engine:
    """One attention replica's batching engine (module docstring)."""

    def __init__(self, attention: AttentionSide, client: ExpertClient | LocalExperts,
                 config: AttentionConfig,
                 on_step: StepObserver | None = None) -> None:
        self.attention = attention
        self.cfg = attention.cfg
        self.config = config
        self.client = client
        pool = PrefixCachingBlockManager if config.enable_prefix_caching else BlockManager
        self.blocks = pool(config.num_blocks, config.block_size)
        self.kv = attention.new_kv_cache(config.num_blocks, config.block_size)
        sc = config.batching
        max_len = min(sc.max_model_len, self.cfg.max_position_embeddings)
        self.batcher = Batcher(self.blocks, BatchingConfig(
            sc.max_num_seqs, sc.max_batch_tokens, max_len, sc.max_waiting))
        rows = client.max_rows()
        if rows < sc.max_batch_tokens:
            raise UserError(f"--max-batch-tokens {sc.max_batch_tokens} exceeds what one "
                            f"dispatch slot of the expert nodes holds ({rows} rows): start them "
                            f"with --max-batch-tokens >= {sc.max_batch_tokens} (or a larger "
                            "--slot-bytes), or lower this replica's --max-batch-tokens")
        self.runner = PingPongRunner(attention, self.kv, client)
        self.eos_ids = frozenset(self.cfg.eos_token_ids)
        self.sampler = StepSampler(config.model_dir, self.cfg.vocab_size, self.eos_ids)
        self.on_step = on_step
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._listeners: dict[str, Listener] = {}
        self._abort_requested: dict[str, FinishReason] = {}  # request id -> reason
        self._new_placement: Placement | None = None
        self._step = 0
        self._lanes: list[LaneStep | None] = [None] * config.micro_batches  # engine thread only
        # Deferred delivery (module docstring): events under _lock, in emission order; step
        # observations engine-thread only.
        self._outbox: list[tuple[Listener, TokenEvent]] = []
        self._observed: list[tuple[StepPlan, StepTimings]] = []
        self.runner.on_wait = self._deliver
        self.pause = ExpertPause(config.expert_wait_s)  # steps wait for lost experts (lock)

    # ------------------------------------------------------------------ called by handlers
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               listener: Listener, resumed: list[int] | None = None,
               trace: tuple[bytes, bytes] | None = None) -> None:
        """Admit a request: the one place a replica accepts one (both gRPC calls come here).

        Raises UserError (bad input: the request id, token ids, a request that can never fit)
        or QueueFull (retry elsewhere). ``params.max_tokens`` None becomes the rest of the
        context.
        """
        check_request_id(request_id)
        resumed = list(resumed or [])
        if not prompt:
            raise UserError("prompt_token_ids is empty")
        vocab = self.cfg.vocab_size
        for name, ids in (("prompt_token_ids", prompt), ("output_token_ids", resumed)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise UserError(f"{name} contains {bad}, outside the vocabulary [0, {vocab})")
        if params.max_tokens is None:
            rest = self.batcher.config.max_model_len - len(prompt)
            params = dataclasses.replace(params, max_tokens=max(1, rest))
        req = Request(request_id, list(prompt), params, time.monotonic(), output=resumed,
                      num_resumed=len(resumed), num_streamed=len(resumed),
                      generator=make_generator(params, self.attention.device),
                      trace=trace, logprobs=[None] * len(resumed),
                      grammar=self.sampler.matcher(params, resumed),
                      prompt_logprobs=[] if params.prompt_logprobs is not None else None)
        with self._lock:
            self.batcher.add(req)
            self._listeners[request_id] = listener
            done = finish_reason(params, resumed, self.eos_ids) if resumed else None
            if done is not None:  # resumed output already complete: finish at once
                self._finish_locked(req, done)
                self._deliver_locked()
        self._wake.set()

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a request now; False if unknown or already finished. ``reason`` is what it is
        counted as (STOP: the client ended it on a stop string it matched itself)."""
        with self._lock:
            req = self.batcher.get(request_id)
            if req is None:
                return False
            if req in self.batcher.running:
                self._abort_requested[request_id] = reason  # once its lane is between steps
            else:
                self._finish_locked(req, reason)
                self._deliver_locked()
        self._wake.set()
        return True

    def finished_counts(self) -> dict[str, int]:
        """Requests finished so far by reason, whether or not a listener took the final event
        (a client that went away is counted as "abort")."""
        with self._lock:
            return dict(self.batcher.finished_by_reason)

    # ------------------------------------------- placement (services/attention/placement.py)
    @property
    def placement(self) -> Placement:
        """The placement in force (one passed to :meth:`set_placement` is not, until no lane
        is mid-step)."""
        return self.client.placement

    def set_placement(self, placement: Placement) -> None:
        """Install a new expert placement once no lane is mid-step."""
        with self._lock:
            self._new_placement = placement
        self._wake.set()

    def attached_nodes(self) -> dict[str, str]:
        """Expert nodes this replica is attached to (they hold its reply link) -> dispatch URL;
        a copy. Attaching happens on the server's event loop only."""
        return dict(self.client.attached)

    def note_attached(self, node_id: str, dispatch_url: str) -> None:
        """Record an ``Expert.Attach`` made for a placement (event loop only); the next
        :meth:`set_placement` opens a fresh dispatch link to the node."""
        self.client.attached[node_id] = dispatch_url
        self.client.reattached.add(node_id)

    def experts_complete(self) -> bool:
        """Whether every expert has a live replica in the routing table in force."""
        return self.client.routes_complete()

    def nodes_down(self) -> set[str]:
        """Expert nodes the replica routes around now (a copy: the engine thread writes it)."""
        return set(self.client.down)

    def load(self) -> dict[str, float]:
        with self._lock:
            return {"running": len(self.batcher.running),
                    "waiting": len(self.batcher.waiting),
                    "kv_usage": self.blocks.usage,
                    "free_blocks": self.blocks.num_free_blocks}

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Go round the lanes until ``stop`` is set; sleeps (no spinning) while there is no
        work."""
        try:
            while not stop.is_set():
                try:
                    busy = self.tick()
                except Exception:  # noqa: BLE001 - a bug in one step must not stop the replica
                    log.exception("engine step failed outside the forward pass")
                    busy = False
                if not busy:
                    self._deliver()
                    self._wake.wait(0.05)
                    self._wake.clear()
        finally:
            self._deliver()

    def tick(self) -> bool:
        """One turn of every lane; False when no lane had anything to do. What was deferred
        before the turn is delivered by its end (if no combine wait delivered it sooner)."""
        overdue = bool(self._outbox or self._observed)
        busy = False
        for lane in range(len(self._lanes)):
            # Idle while it is handled: whatever goes wrong below, a lane is never left
            # holding a step that would be run (and sampled) a second time.
            ls, self._lanes[lane] = self._lanes[lane], None
            if ls is not None:
                ls = self._advance(ls)
                busy = True
            if ls is None:  # between steps: start the next one straight away
                ls = self._start(lane)
                busy |= ls is not None
            self._lanes[lane] = ls
        if overdue or not busy:
            self._deliver()
        return busy

    def _deliver(self) -> None:
        """Hand the deferred events to their listeners and run the deferred step observers."""
        if self._outbox:
            with self._lock:
                self._deliver_locked()
        observed, self._observed = self._observed, []
        for plan, timings in observed:
            try:
                self.on_step(plan, timings)
            except Exception:  # noqa: BLE001 - an observer must not take the engine down
                log.exception("step observer failed")

    def _deliver_locked(self) -> None:
        # Under the lock, in order: a request's events never overtake each other, whichever
        # thread emitted them. Listeners only queue (EventRelay.push), so this is short.
        outbox, self._outbox = self._outbox, []
        for listener, event in outbox:
            try:
                listener(event)
            except Exception:  # a broken listener must not take the engine down
                log.exception("listener for %s failed", event.request_id)

    def _start(self, lane: int) -> LaneStep | None:
        """Schedule lane ``lane``'s next step and run it to its first dispatch."""
        with self._lock:
            placement = self._new_placement
            if placement is not None:
                if any(ls is not None for i, ls in enumerate(self._lanes) if i != lane):
                    return None  # drain: the placement switches with no dispatch in flight
                self._new_placement = None
        if placement is not None:
            # Not under the lock: switching may connect to nodes (network waits), and
            # submit/abort/load must not wait for that (heartbeats read load()).
            try:
                self.client.set_placement(placement)
            except Exception:  # noqa: BLE001 - keep the old placement; the next push retries
                log.exception("could not switch to placement epoch %d", placement.epoch)
        with self._lock:
            if self.pause.holding(self.client.routes_complete(), self._fail_paused_locked,
                                  self.client.placement.epoch):
                return None
            for rid, why in list(self._abort_requested.items()):
                req = self.batcher.get(rid)
                if req is None:
                    del self._abort_requested[rid]
                elif (req.status is not Status.RUNNING or req.lane == lane
                      or self._lanes[req.lane] is None):  # not mid-step
                    self._finish_locked(req, why)
            plan = self.batcher.schedule(lane, len(self._lanes))
            if not plan.chunks:
                return None
            step = self._step
            self._step += 1
        now = time.monotonic()
        for c in plan.chunks:
            if c.request.first_scheduled is None:
                c.request.first_scheduled = now
        try:
            mb = build_micro_batch(plan.chunks, self.blocks, self.attention.device,
                                   self.cfg.sliding_window)
            ls = self.runner.start(step, lane, plan, mb)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            self._fail(plan, step, exc)
            return None
        return self._advance(ls)

    def _advance(self, ls: LaneStep) -> LaneStep | None:
        """Run ``ls`` on to its next dispatch; None once its step is over (sampled and
        emitted, or failed: then its requests are finished with the error)."""
        try:
            logits = self.runner.advance(ls)
            if logits is not None:
                self._sample(ls, logits)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            self.runner.abandon(ls)
            self._fail(ls.plan, ls.step, exc)
            return None
        if logits is None:
            return ls
        if self.on_step is not None:
            self._observed.append((ls.plan, ls.timings))  # run by _deliver
        return None

    def _sample(self, ls: LaneStep, logits: torch.Tensor) -> None:
        """Sample the chunks that reached their request's last token and hand the tokens on
        (one logits row per chunk; at decode every chunk samples: the rows as they are)."""
        chunks = ls.mb.chunks
        self.sampler.prompt_logprobs(self.attention, ls.hidden, chunks)
        picked = [j for j, c in enumerate(chunks) if c.samples]
        if not picked:
            return
        reqs = [chunks[j].request for j in picked]
        if len(picked) < len(chunks):
            logits = logits.index_select(0, torch.tensor(picked, device=logits.device))
        tokens, lps = self.sampler.sample(logits, reqs)
        with self._lock:
            for j, (req, tok) in enumerate(zip(reqs, tokens, strict=True)):
                self._accept_locked(req, tok, lps[j] if lps else None)

    def _fail(self, plan: StepPlan, step: int, exc: Exception) -> None:
        """Finish a failed step's requests with the error (the others keep running)."""
        if isinstance(exc, ExpertUnavailable):
            with self._lock:
                if (self.pause.pause_stale(exc.epoch, str(exc)) if isinstance(exc, StalePlacement)
                        else self.pause.pause(self.client.routes_complete(), str(exc))):
                    # lost experts: its requests wait (re-queued) for a placement serving them
                    log.warning("step %d paused: %s", step, exc)
                    for c in plan.chunks:
                        self.batcher.requeue(c.request)
                    return
            log.error("step %d failed: %s", step, exc)
            message = str(exc)
        else:
            log.exception("step %d failed", step, exc_info=exc)
            message = f"internal error in step {step}: {type(exc).__name__}: {exc}"
        with self._lock:
            for c in plan.chunks:
                self._finish_locked(c.request, FinishReason.ERROR, message)

    def _fail_paused_locked(self, message: str) -> None:
        for req in list(self.batcher.waiting):
            self._finish_locked(req, FinishReason.ERROR, message)
        self._deliver_locked()

    # ------------------------------------------------------------------ helpers (lock held)
    def _accept_locked(self, req: Request, token: int, lp: TokenLogprobs | None = None
                       ) -> None:
        if req.request_id not in self._listeners:
            return  # finished meanwhile (abort)
        req.output.append(token)
        self.sampler.accept(req, token, lp)
        reason = finish_reason(req.params, req.output, self.eos_ids)
        stop_id = token if reason is FinishReason.STOP else None
        unsent = len(req.output) - req.num_streamed
        if reason is not None or unsent >= self.config.stream_interval:
            self._emit(req, tuple(req.output[req.num_streamed:]), reason, stop_token_id=stop_id)
        if reason is not None:
            self.batcher.finish(req, reason)
            self._listeners.pop(req.request_id, None)

    def _finish_locked(self, req: Request, reason: FinishReason, error: str | None = None) -> None:
        self.batcher.finish(req, reason)
        self._abort_requested.pop(req.request_id, None)
        # tokens held back by the stream interval go out with the final event
        self._emit(req, tuple(req.output[req.num_streamed:]), reason, error=error)
        self._listeners.pop(req.request_id, None)

    def _emit(self, req: Request, tokens: tuple[int, ...], reason: FinishReason | None,
              error: str | None = None, stop_token_id: int | None = None) -> None:
        listener = self._listeners.get(req.request_id)
        if listener is None:
            return
        index = len(req.output) - len(tokens)
        req.num_streamed = len(req.output)
        lps = tuple(req.logprobs[index:]) if req.params.logprobs is not None else None
        plps, req.prompt_logprobs = req.prompt_logprobs, None  # sent once, with the first
        self._outbox.append((listener, TokenEvent(
            req.request_id, tokens, index, len(req.prompt), len(req.output), reason, error,
            stop_token_id, lps, tuple(plps) if plps is not None else None)))
