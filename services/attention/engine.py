"""The attention replica's engine loop: schedule → micro-batches → ping-pong → sample → emit.

Threads: the engine runs in one dedicated thread (``run``); gRPC handlers call ``submit`` and
``abort`` from the server's event loop. Scheduler state is guarded by one lock that is **not**
held during the forward pass, so submissions and aborts never wait for a step. A running request
that is aborted mid-step is finished at the next step boundary (its KV blocks cannot be freed
while a forward pass may still write them).

Per request the engine emits :class:`TokenEvent` objects to the listener given at submission:
one per sampled token, the last one carrying ``finish_reason``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.attention.config import AttentionConfig
from services.attention.dispatch import ExpertClient
from services.attention.pingpong import PingPongRunner, StepTimings, build_micro_batches
from services.attention.routing import ExpertUnavailable, Placement
from services.attention.scheduler import Request, RequestScheduler, SchedulerConfig, StepPlan
from services.core.kv_cache import BlockManager
from services.core.model import AttentionSide
from services.core.sampling import SamplingParams, finish_reason, sample
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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    stop_token_id: int | None = None


Listener = Callable[[TokenEvent], None]
StepObserver = Callable[[StepPlan, StepTimings], None]


class Engine:
    """One attention replica's batching engine (module docstring)."""

    def __init__(self, attention: AttentionSide, client: ExpertClient, config: AttentionConfig,
                 on_step: StepObserver | None = None) -> None:
        self.attention = attention
        self.cfg = attention.cfg
        self.config = config
        self.client = client
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.kv = attention.new_kv_cache(config.num_blocks, config.block_size)
        sc = config.scheduler
        max_len = min(sc.max_model_len, self.cfg.max_position_embeddings)
        self.scheduler = RequestScheduler(self.blocks, SchedulerConfig(
            sc.max_num_seqs, sc.max_batch_tokens, max_len, sc.max_waiting))
        rows = client.max_rows()
        if rows < sc.max_batch_tokens:
            raise UserError(f"max_batch_tokens {sc.max_batch_tokens} exceeds what one dispatch "
                            f"slot of the expert nodes holds ({rows} rows); raise the expert "
                            "nodes' slot size or lower max_batch_tokens")
        self.runner = PingPongRunner(attention, self.kv, client)
        self.eos_ids = frozenset(self.cfg.eos_token_ids)
        self.on_step = on_step
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._listeners: dict[str, Listener] = {}
        self._abort_requested: set[str] = set()
        self._new_placement: Placement | None = None
        self._step = 0

    # ------------------------------------------------------------------ called by handlers
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               listener: Listener, resumed: list[int] | None = None,
               trace: tuple[bytes, bytes] | None = None) -> None:
        """Queue a request; raises UserError (bad input) or QueueFull (retry elsewhere)."""
        resumed = list(resumed or [])
        if not prompt:
            raise UserError("prompt_token_ids is empty")
        vocab = self.cfg.vocab_size
        for name, ids in (("prompt_token_ids", prompt), ("output_token_ids", resumed)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise UserError(f"{name} contains {bad}, outside the vocabulary [0, {vocab})")
        req = Request(request_id, list(prompt), params, time.monotonic(), output=resumed,
                      num_resumed=len(resumed), num_streamed=len(resumed),
                      generator=params.make_generator(),
                      trace=trace)
        with self._lock:
            self.scheduler.add(req)
            self._listeners[request_id] = listener
            done = finish_reason(params, resumed, self.eos_ids) if resumed else None
            if done is not None:  # resumed output already complete: finish at once
                self._finish_locked(req, done)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Cancel a request; False if unknown or already finished."""
        with self._lock:
            req = self.scheduler.get(request_id)
            if req is None:
                return False
            if req in self.scheduler.running:
                self._abort_requested.add(request_id)  # finished at the next step boundary
            else:
                self._finish_locked(req, "abort")
        self._wake.set()
        return True

    def set_placement(self, placement: Placement) -> None:
        """Install a new expert placement at the next step boundary."""
        with self._lock:
            self._new_placement = placement
        self._wake.set()

    def load(self) -> dict[str, float]:
        with self._lock:
            return {"running": len(self.scheduler.running),
                    "waiting": len(self.scheduler.waiting),
                    "kv_usage": self.blocks.usage,
                    "free_blocks": self.blocks.num_free_blocks}

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; sleeps (no spinning) while there is no work."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception:  # noqa: BLE001 - a bug in one step must not stop the replica
                log.exception("engine step failed outside the forward pass")
                busy = False
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def step(self) -> bool:
        """Run one step; False when there was nothing to do."""
        with self._lock:
            if self._new_placement is not None:
                placement, self._new_placement = self._new_placement, None
                try:
                    self.client.set_placement(placement)
                except Exception:  # noqa: BLE001 - keep the old placement; the next push retries
                    log.exception("could not switch to placement epoch %d", placement.epoch)
            for rid in list(self._abort_requested):
                req = self.scheduler.get(rid)
                if req is not None:
                    self._finish_locked(req, "abort")
            self._abort_requested.clear()
            plan = self.scheduler.schedule()
            step = self._step
            self._step += 1
        if not plan.chunks:
            return False
        for c in plan.chunks:
            if c.request.first_scheduled is None:
                c.request.first_scheduled = time.monotonic()
        mbs = build_micro_batches(plan.chunks, self.config.micro_batches, self.blocks,
                                  self.attention.device, self.cfg.sliding_window)
        try:
            logits, timings = self.runner.run(step, mbs)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            if isinstance(exc, ExpertUnavailable):
                log.error("step %d failed: %s", step, exc)
                message = str(exc)
            else:
                log.exception("step %d failed", step)
                message = f"internal error in step {step}: {type(exc).__name__}: {exc}"
            with self._lock:
                for c in plan.chunks:
                    self._finish_locked(c.request, "error", message)
            return True
        # Sample the chunks that reached their request's last token (one row per chunk).
        rows = [(c, lg[j]) for mb, lg in zip(mbs, logits, strict=True)
                for j, c in enumerate(mb.chunks) if c.samples]
        tokens: list[int] = []
        if rows:
            stacked = torch.stack([r for _, r in rows])
            tokens = sample(stacked, [c.request.params for c, _ in rows],
                            [c.request.generator for c, _ in rows],
                            [len(c.request.output) for c, _ in rows], self.eos_ids).tolist()
        with self._lock:
            for (c, _), tok in zip(rows, tokens, strict=True):
                self._accept_locked(c.request, tok)
        if self.on_step is not None:
            self.on_step(plan, timings)
        return True

    # ------------------------------------------------------------------ helpers (lock held)
    def _accept_locked(self, req: Request, token: int) -> None:
        if req.request_id not in self._listeners:
            return  # finished meanwhile (abort)
        req.output.append(token)
        reason = finish_reason(req.params, req.output, self.eos_ids)
        stop_id = token if reason == "stop" else None
        unsent = len(req.output) - req.num_streamed
        if reason is not None or unsent >= self.config.stream_interval:
            self._emit(req, tuple(req.output[req.num_streamed:]), reason, stop_token_id=stop_id)
        if reason is not None:
            self.scheduler.finish(req, reason)
            self._listeners.pop(req.request_id, None)

    def _finish_locked(self, req: Request, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(req, reason)
        self._abort_requested.discard(req.request_id)
        # tokens held back by the stream interval go out with the final event
        self._emit(req, tuple(req.output[req.num_streamed:]), reason, error=error)
        self._listeners.pop(req.request_id, None)

    def _emit(self, req: Request, tokens: tuple[int, ...], reason: str | None,
              error: str | None = None, stop_token_id: int | None = None) -> None:
        listener = self._listeners.get(req.request_id)
        if listener is None:
            return
        index = len(req.output) - len(tokens)
        req.num_streamed = len(req.output)
        event = TokenEvent(req.request_id, tokens, index, len(req.prompt), len(req.output),
                           reason, error, stop_token_id)
        try:
            listener(event)
        except Exception:  # a broken listener must not take the engine down
            log.exception("listener for %s failed", req.request_id)
