"""One request through the gateway, shared by the REST app and the gRPC front door.

:func:`check_request` validates what both front doors accept (sampling ranges, stop strings,
token ids, context length) with the same messages; :meth:`Generation.run` streams a request as
:class:`Delta` s: text that never splits a character nor shows a stop string, the token ids
behind it, and on the last delta the finish reason and usage. A request with several choices
(``n``, ``best_of``) runs one sequence per choice: :func:`sibling_sampling` gives each its
seed, :func:`merge_streams` interleaves their deltas, :func:`collect` gathers one whole and
:func:`best_of_order` ranks them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import tracing
from services.core.logits_processors import TokenLogprobs
from services.core.request import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    U64_MAX,
    FinishReason,
    InvalidField,
    SamplingParams,
)
from services.gateway.backend import Backend, GenRequest
from services.gateway.errors import GatewayError, bad_request, invalid_field
from services.gateway.metrics import GatewayMetrics
from services.gateway.text import ModelText

MAX_CHOICES = 64  # sequences per request (prompts x n, or best_of): each is its own sequence


def check_choices(n: int | None, best_of: int | None, best_of_param: str = "best_of"
                  ) -> tuple[int, int]:
    """(n, best_of) of a request, defaults applied (None = 1 and n); a 400 naming the field
    when out of range."""
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    if best_of is None:
        return n, n
    if not n <= best_of <= MAX_CHOICES:
        raise bad_request(f"best_of must be in [n={n}, {MAX_CHOICES}], got {best_of}",
                          best_of_param)
    return n, best_of


@dataclass
class Delta:
    """A piece of the answer; ``finish_reason`` is set on the last one only."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    logprobs: list[TokenLogprobs] | None = None  # per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # on the first delta, when asked for


def make_sampling(*, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None,
                  max_tokens: int | None = None, stop_token_ids: list[int] | None = None,
                  ignore_eos: bool = False, max_tokens_param: str = "max_tokens",
                  min_tokens: int | None = None, min_p: float | None = None,
                  presence_penalty: float | None = None, frequency_penalty: float | None = None,
                  repetition_penalty: float | None = None,
                  logit_bias: tuple[tuple[int, float], ...] = (),
                  bad_words_ids: tuple[tuple[int, ...], ...] = (),
                  logprobs: int | None = None, grammar: str | None = None,
                  logprobs_param: str = "logprobs", prompt_logprobs: int | None = None
                  ) -> SamplingParams:
    """OpenAI request fields -> :class:`SamplingParams` (a 400 naming the field as the client
    spelled it; None = the default). A negative seed is taken as its 64-bit two's
    complement."""
    if seed is not None and -(1 << 63) <= seed < 0:
        seed &= U64_MAX
    try:
        return SamplingParams(
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=-1 if top_k is None else top_k,
            max_tokens=max_tokens, seed=seed, stop_token_ids=tuple(stop_token_ids or ()),
            ignore_eos=ignore_eos, min_tokens=min_tokens or 0, min_p=min_p or 0.0,
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            logit_bias=logit_bias, bad_words_ids=bad_words_ids, logprobs=logprobs,
            grammar=grammar, prompt_logprobs=prompt_logprobs)
    except InvalidField as exc:
        raise invalid_field(exc, names={"max_tokens": max_tokens_param,
                                        "logprobs": logprobs_param}) from None


def check_request(text: ModelText, prompt_ids: list[int], sampling: SamplingParams,
                  stop: tuple[str, ...], prompt_param: str = "prompt") -> None:
    """The checks that need the model: ids in the vocab, prompt + max_tokens fit the context."""
    card = text.card
    if not prompt_ids:
        raise bad_request(f"{prompt_param} must not be empty", prompt_param)
    text.check_ids(prompt_ids, prompt_param)
    text.check_ids(list(sampling.stop_token_ids), "stop_token_ids")
    text.check_ids([t for t, _ in sampling.logit_bias], "logit_bias")
    if sampling.top_k > card.vocab_size:
        raise bad_request(f"top_k must be <= vocab_size {card.vocab_size}, got "
                          f"{sampling.top_k}", "top_k")
    if len(prompt_ids) >= card.max_model_len:
        raise bad_request(f"the prompt has {len(prompt_ids)} tokens; this model's context "
                          f"length is {card.max_model_len}", prompt_param)
    if sampling.max_tokens and len(prompt_ids) + sampling.max_tokens > card.max_model_len:
        raise bad_request(f"{len(prompt_ids)} prompt tokens + max_tokens {sampling.max_tokens} "
                          f"exceed this model's context length {card.max_model_len}",
                          "max_tokens")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop strings", "stop")
    for s in stop:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise bad_request(f"stop strings must be 1..{MAX_STOP_CHARS} characters", "stop")


class Generation:
    """Validated request -> replica -> text deltas, with gateway metrics."""

    def __init__(self, text: ModelText, backend: Backend, metrics: GatewayMetrics) -> None:
        self.text = text
        self.backend = backend
        self.metrics = metrics

    async def run(self, req: GenRequest) -> AsyncIterator[Delta]:
        """Stream deltas; raises :class:`GatewayError` (before or during the stream)."""
        stream = self.text.stream(req.prompt_ids, req.stop, req.include_stop_str)
        held: list[int] = []  # ids whose text is not released yet
        held_lps: list[TokenLogprobs] | None = [] if req.sampling.logprobs is not None else None
        prompt_lps: list[TokenLogprobs] | None = None  # until the first delta takes them
        prompt_tokens = len(req.prompt_ids)
        completion = 0
        self.metrics.in_flight.inc()
        clock = self.metrics.request(req.arrival_mono, prompt_tokens)
        ended = FinishReason.ABORT  # unless it ends below (a client gone, the task cancelled)
        span, downstream = None, []
        if tracing.enabled():  # one trace per request: gateway -> attention -> experts
            span = tracing.tracer(__name__).start_span(
                "gateway.generate", tracing.context_from_headers(req.trace_headers),
                kind=SpanKind.SERVER, attributes={"megascale.request_id": req.request_id,
                                                  "megascale.prompt_tokens": prompt_tokens})
            downstream = tracing.inject_headers(trace.set_span_in_context(span))
        down = dataclasses.replace(req, trace_headers=downstream)
        events = self.backend.stream(down)
        try:
            async for ev in events:
                held.extend(ev.token_ids)
                if held_lps is not None:
                    held_lps.extend(ev.logprobs or ())
                if ev.prompt_logprobs is not None:
                    prompt_lps = ev.prompt_logprobs
                completion = ev.completion_tokens
                clock.tokens_relayed(len(ev.token_ids))
                piece = stream.push(ev.token_ids)
                if stream.stopped:
                    down.ended_as = ended = FinishReason.STOP  # the abort that follows is a stop
                    clock.finish(ended)
                    yield self._last(req, piece, held, FinishReason.STOP, prompt_tokens,
                                     completion, logprobs=held_lps, prompt_logprobs=prompt_lps)
                    return
                if ev.finish_reason is not None:
                    piece += stream.finish()
                    ended = ev.finish_reason
                    clock.finish(ended)
                    yield self._last(req, piece, held, ev.finish_reason, prompt_tokens,
                                     completion, ev.error, held_lps, prompt_lps)
                    return
                # A delta per burst of tokens, its text possibly empty (a character's bytes
                # still incomplete, or a stop string still possible): clients see progress
                # per token as vLLM streams it, and the text follows once it is final.
                if piece or ev.token_ids:
                    yield Delta(piece, held, prompt_tokens=prompt_tokens,
                                completion_tokens=completion, logprobs=held_lps,
                                prompt_logprobs=prompt_lps)
                    prompt_lps = None
                    held = []
                    held_lps = [] if held_lps is not None else None
            raise GatewayError(502, "the replica stream ended without a finish reason")
        except GatewayError:
            ended = FinishReason.ERROR
            raise
        finally:
            clock.finish(ended)
            await events.aclose()  # cancels the downstream call if still running
            self.metrics.in_flight.dec()
            if span is not None:
                span.set_attribute("megascale.completion_tokens", completion)
                span.end()

    def _last(self, req: GenRequest, piece: str, held: list[int], reason: FinishReason,
              prompt_tokens: int, completion: int, error: str = "",
              logprobs: list[TokenLogprobs] | None = None,
              prompt_logprobs: list[TokenLogprobs] | None = None) -> Delta:
        return Delta(piece, list(held), reason, prompt_tokens, completion, error,
                     list(logprobs) if logprobs is not None else None, prompt_logprobs)


def sibling_sampling(sp: SamplingParams, j: int, count: int) -> SamplingParams:
    """Choice ``j`` of ``count`` that share a prompt: with a seed, its own (seed + j), so the
    choices differ and each is reproducible (vLLM does the same)."""
    if sp.seed is None or count == 1:
        return sp
    return dataclasses.replace(sp, seed=(sp.seed + j) & U64_MAX)


def best_of_order(cumulative_logprobs: Sequence[float], keep: int) -> list[int]:
    """Indices of the ``keep`` sequences with the highest cumulative logprob, best first
    (``best_of``; ties keep their order)."""
    return sorted(range(len(cumulative_logprobs)), key=lambda i: -cumulative_logprobs[i])[:keep]


@dataclass
class Collected:
    """A whole sequence: its text, ids, last delta and log-probabilities."""

    text: str
    ids: list[int]
    last: Delta
    lps: list[TokenLogprobs]
    plps: list[TokenLogprobs] | None  # the prompt's, when asked for

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.lps)


async def collect(deltas: AsyncIterator[Delta]) -> Collected:
    """Run ``deltas`` to its end (raises what it raises; closes it in any case)."""
    parts: list[str] = []
    ids: list[int] = []
    lps: list[TokenLogprobs] = []
    plps: list[TokenLogprobs] | None = None
    last: Delta | None = None
    try:
        async for d in deltas:
            parts.append(d.text)
            ids.extend(d.token_ids)
            lps.extend(d.logprobs or ())
            plps = d.prompt_logprobs if d.prompt_logprobs is not None else plps
            last = d
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    assert last is not None and last.finish_reason is not None
    return Collected("".join(parts), ids, last, lps, plps)


async def collect_all(streams: Sequence[AsyncIterator[Delta]]) -> list[Collected]:
    """:func:`collect` every stream at once; the first error cancels the others (their
    requests are aborted downstream) and is raised."""
    tasks = [asyncio.ensure_future(collect(st)) for st in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge_streams(streams: Sequence[AsyncIterator[Delta]],
                        firsts: Sequence[Delta] | None = None
                        ) -> AsyncIterator[tuple[int, Delta | GatewayError]]:
    """Interleave the choices' streams as their deltas arrive: ``(i, delta)`` up to each
    one's last delta, ``(i, error)`` when stream ``i`` raises (it yields nothing more; the
    caller decides whether the others go on). ``firsts[i]``, if given, is a delta already
    taken from stream ``i``. Every stream is closed when this ends or is closed."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            d: Delta | None = firsts[i] if firsts is not None else await anext(streams[i], None)
            while d is not None:
                await queue.put((i, d))
                if d.finish_reason is not None:
                    break
                d = await anext(streams[i], None)
        except GatewayError as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(streams)
        while remaining:
            i, d = await queue.get()
            if d is done:
                remaining -= 1
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for st in streams:
            await st.aclose()  # type: ignore[attr-defined]
