"""The replica's sampling step: one lane step's logits rows -> tokens (and log-probabilities),
with each request's grammar, logits processors and ``min_tokens`` (docs/ARCHITECTURE.md §3
step 8).

The engine calls :meth:`StepSampler.sample` with the requests that sample this step and
:meth:`StepSampler.accept` for each token it keeps. A step where no request uses a grammar,
a processor or logprobs costs what plain sampling costs: each extra is gated by one test per
row. Grammar states (services/core/structured.py ``RequestGrammar``) live on the request and
compute their next mask on a worker thread while the lane's forward pass runs; the grammar
compiler (tokenizer index) is built the first time a request brings a grammar.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from services.attention.batching import Request, ScheduledChunk
from services.core.logits_processors import TokenLogprobs, logprobs
from services.core.model import AttentionSide
from services.core.request import SamplingParams
from services.core.sampling import sample
from services.core.structured import GrammarCompiler


class StepSampler:
    """Sampling with grammars, processors and logprobs for one replica (module docstring)."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: Collection[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler.from_model_dir(
                    str(self.model_dir), self.vocab_size, self.eos_ids)
            return self._compiler

    def matcher(self, params: SamplingParams, resumed: Sequence[int]) -> Any:
        """The request's grammar state (None without a grammar), advanced past ``resumed``,
        its first mask on the way; InvalidField when the grammar does not compile."""
        if params.grammar is None:
            return None
        return self.compiler().request(params.grammar, resumed)

    def sample(self, logits: torch.Tensor, reqs: Sequence[Request]
               ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """One token per row of ``logits`` [len(reqs), V], and the rows' logprobs (None when
        no request asked for any)."""
        params = [r.params for r in reqs]
        allowed = rows = None
        if any(r.grammar is not None for r in reqs):
            rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
            allowed = self.compiler().allowed([reqs[i].grammar for i in rows], logits.device)
        history = any(p.penalized for p in params)
        tokens = sample(logits, params, [r.generator for r in reqs],
                        [len(r.output) for r in reqs], self.eos_ids,
                        prompts=[r.prompt for r in reqs] if history else None,
                        outputs=[r.output for r in reqs] if history else None,
                        allowed=allowed, allowed_rows=rows)
        lps = None
        if any(p.logprobs is not None for p in params):
            lps = logprobs(logits, tokens, [p.logprobs for p in params])
        return tokens.tolist(), lps

    @staticmethod
    def prompt_logprobs(attention: AttentionSide, hidden: torch.Tensor,
                        chunks: Sequence[ScheduledChunk]) -> None:
        """Record prompt logprobs for the chunks (of a finished lane step, ``hidden`` [T, H]
        its last layer's rows in chunk order) whose request asks for them: the row at
        position p gives prompt token p + 1's. Positions already recorded (a recompute after
        preemption) are skipped; a chunk that starts past the recorded ones (positions the
        step did not compute, e.g. a prefix served from a cache) records nothing."""
        if not any(c.request.prompt_logprobs is not None for c in chunks):
            return
        rows, targets, ks, owners = [], [], [], []
        offset = 0
        for c in chunks:
            req = c.request
            if req.prompt_logprobs is not None and c.start <= len(req.prompt_logprobs):
                first = len(req.prompt_logprobs)
                for p in range(first, min(c.start + c.num_tokens, len(req.prompt) - 1)):
                    rows.append(offset + p - c.start)
                    targets.append(req.prompt[p + 1])
                    ks.append(req.params.prompt_logprobs)
                    owners.append(req)
            offset += c.num_tokens
        if not rows:
            return
        dev = hidden.device
        with torch.inference_mode():
            logits = attention.logits(hidden, torch.tensor(rows, device=dev))
        lps = logprobs(logits, torch.tensor(targets, device=dev), ks, ranks=True)
        for req, lp in zip(owners, lps, strict=True):
            req.prompt_logprobs.append(lp)

    @staticmethod
    def accept(req: Request, token: int, lp: TokenLogprobs | None) -> None:
        """Record a kept token's logprobs and advance the request's grammar."""
        if req.params.logprobs is not None:
            req.logprobs.append(lp)
        if req.grammar is not None:
            req.grammar.advance(token)
