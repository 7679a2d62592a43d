"""Structured outputs: grammars (llguidance) and the token masks they put on sampling.

One grammar format travels: an llguidance grammar (``SamplingParams.grammar``, the JSON string
:func:`compile_grammar` returns). The gateway compiles the OpenAI / vLLM spellings
(``response_format`` json_object / json_schema, ``structured_outputs`` / ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar``) into it and validates it against the
tokenizer (:meth:`GrammarCompiler.check`); the attention replica, which samples, keeps one
:class:`RequestGrammar` per request. Its next-token mask is computed off the critical path: on a
worker thread as soon as the request is admitted or its last token accepted, so it is ready
while the lane runs its next forward pass (layers and expert round trips); sampling only
stacks the ready masks (:meth:`GrammarCompiler.allowed`).

Why llguidance (not xgrammar): its wheel has no Python dependencies (xgrammar pulls triton and
a CUDA-capable torch), it builds a tokenizer index in milliseconds, and computes a mask without
precompiling the grammar (~tens of µs per row), so a new schema costs no start-up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import torch

from services.core.request import InvalidField

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def compile_grammar(kind: str, spec: Any, field: str) -> str:
    """An OpenAI / vLLM structured-output spec -> an llguidance grammar (InvalidField names
    ``field`` when the spec is not of the kind's shape).

    ``json_schema``: a schema (dict, or its JSON text), compact JSON unless the schema's
    ``x-guidance`` says ``whitespace_flexible``; ``json_object``: any JSON object;
    ``regex``: a regular expression; ``choice``: a list of strings (the output is one of
    them); ``grammar``: a Lark (or GBNF) grammar.
    """
    try:
        if kind == "json_object":
            spec, kind = {"type": "object"}, "json_schema"
        if kind == "json_schema":
            if isinstance(spec, str):
                spec = json.loads(spec)
            if not isinstance(spec, dict):
                raise InvalidField(field, f"{field} must be a JSON schema object")
            # Compact JSON (no free whitespace between tokens) unless the schema says
            # otherwise: a weak model can otherwise pad with whitespace up to max_tokens.
            spec = {"x-guidance": {"whitespace_flexible": False}, **spec}
            return llguidance.grammar_from("json_schema", json.dumps(spec))
        if kind == "choice":
            if (not isinstance(spec, list) or not spec
                    or not all(isinstance(c, str) and c for c in spec)):
                raise InvalidField(field, f"{field} must be a non-empty list of non-empty "
                                   "strings")
            return llguidance.grammar_from("choice", json.dumps(spec))
        if kind in ("regex", "grammar"):
            if not isinstance(spec, str) or not spec:
                raise InvalidField(field, f"{field} must be a non-empty string")
            return llguidance.grammar_from("regex" if kind == "regex" else "grammar", spec)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidField(field, f"{field}: {_one_line(exc)}") from None
    raise InvalidField(field, f"{field}: unknown structured output kind {kind!r}")


def _one_line(exc: Exception | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class GrammarCompiler:
    """The tokenizer-side half of llguidance for one model: validates grammars and makes
    per-request matchers and batch masks. Thread-safe; build it once per process.

    ``tokenizer`` is the checkpoint's fast Hugging Face tokenizer; ``vocab_size`` the model's
    logits width (it may exceed the tokenizer's: padded ids are never allowed); ``eos_ids``
    the ids that end a request once the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        import llguidance.hf  # imports transformers: only where grammars are used

        eos = [t for t in eos_ids if 0 <= t < vocab_size]
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                 eos_token=eos or None)
        self._words = (vocab_size + 31) // 32
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._bits = torch.arange(32, dtype=torch.int32)

    @classmethod
    def from_model_dir(cls, model_dir: str, vocab_size: int, eos_ids: Sequence[int]
                       ) -> GrammarCompiler:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir), vocab_size, eos_ids)

    def check(self, grammar: str, field: str = "grammar") -> None:
        """InvalidField naming ``field`` unless ``grammar`` compiles for this tokenizer."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tok)
        if error:
            raise InvalidField(field, f"{field}: {_one_line(error)}")

    def matcher(self, grammar: str, consumed: Sequence[int] = ()) -> llguidance.LLMatcher:
        """A fresh matcher for one request, advanced past ``consumed`` (resumed output)."""
        self.check(grammar)
        m = llguidance.LLMatcher(self._tok, grammar)
        for t in consumed:
            if not m.consume_token(t):
                raise InvalidField("output_token_ids", "output_token_ids do not follow the "
                                   f"grammar: {_one_line(m.get_error())}")
        return m

    def request(self, grammar: str, consumed: Sequence[int] = ()) -> RequestGrammar:
        """A request's grammar state, its first mask already on the way."""
        return RequestGrammar(self, self.matcher(grammar, consumed))

    def mask_async(self, matcher: llguidance.LLMatcher) -> Future:
        """The matcher's next-token bitmask (int32 [1, words]), computed on the worker."""
        return self._pool.submit(self._mask, matcher)

    def _mask(self, matcher: llguidance.LLMatcher) -> torch.Tensor:
        bitmask = torch.full((1, self._words), -1, dtype=torch.int32)
        # what llguidance.torch.fill_next_token_bitmask does (that module imports torch's
        # compiler stack, seconds at start-up, for a kernel not used here)
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        return bitmask

    def allowed(self, grammars: Sequence[RequestGrammar | None],
                device: torch.device | str) -> torch.Tensor:
        """The tokens each row may sample next, bool [B, vocab_size] on ``device`` (a row
        without a grammar allows everything)."""
        full = torch.full((1, self._words), -1, dtype=torch.int32)
        bitmask = torch.cat([full if g is None else g.mask() for g in grammars])
        # [B, W] int32 words -> [B, W * 32] bits, little-endian within a word
        bits = (bitmask.unsqueeze(-1) >> self._bits) & 1
        return bits.reshape(len(grammars), -1)[:, : self.vocab_size].bool().to(device)


class RequestGrammar:
    """One request's grammar: its matcher and the mask for its next token (a future, started
    when the previous token was accepted). Used by the engine thread only."""

    def __init__(self, compiler: GrammarCompiler, matcher: llguidance.LLMatcher) -> None:
        self.compiler = compiler
        self.matcher = matcher
        self._next = compiler.mask_async(matcher)

    def mask(self) -> torch.Tensor:
        """The next-token bitmask, int32 [1, words] (waits for the worker if needed)."""
        return self._next.result()

    def advance(self, token: int) -> None:
        """Feed a sampled token and start computing the next mask. A token the mask allowed
        always passes; a finished grammar ignores what follows (the request stops on eos)."""
        self._next.result()  # the worker never reads the matcher while it changes
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
        self._next = self.compiler.mask_async(self.matcher)
