"""Text <-> tokens at the gateway: tokenizer, chat template, incremental text, stop strings.

:class:`ModelText` loads the checkpoint's tokenizer (``AutoTokenizer``, so the chat template in
tokenizer_config.json applies) and the facts the gateway validates against (vocab size,
context length). :class:`TextStream` turns a request's streamed token ids into text deltas that
never split a character and never contain a stop string.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.detokenize import IncrementalDetokenizer
from services.core.structured import GrammarCompiler
from services.errors import ConfigError
from services.gateway.errors import bad_request

log = logging.getLogger("megascale.gateway")


@dataclass(frozen=True)
class ModelCard:
    """What the gateway serves (the ListModels / GET /v1/models entry)."""

    id: str
    family: str
    max_model_len: int
    vocab_size: int
    created_unix_s: float


class ModelText:
    """The served model's tokenizer and limits (one per gateway process)."""

    def __init__(self, model_dir: str, served_name: str, max_model_len: int = 0) -> None:
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        vocab = cfg.get("vocab_size")
        ctx = cfg.get("max_position_embeddings", cfg.get("max_seq_len"))  # DBRX: max_seq_len
        if not isinstance(vocab, int) or not isinstance(ctx, int) or vocab < 1 or ctx < 1:
            raise ConfigError(f"{path}: vocab_size and max_position_embeddings must be "
                              "positive integers")
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # transformers raises many types for a bad tokenizer
            raise ConfigError(f"{model_dir}: cannot load the tokenizer ({exc})") from None
        # The Rust tokenizer decodes much faster than the Python wrapper (same output).
        self._decoder = getattr(self.tokenizer, "backend_tokenizer", None) or self.tokenizer
        self.card = ModelCard(id=served_name, family=str(cfg.get("model_type", "")),
                              max_model_len=min(ctx, max_model_len or ctx), vocab_size=vocab,
                              created_unix_s=time.time())
        # No token spans more UTF-8 bytes than its vocabulary entry has (byte-level BPE: one
        # char per byte; SentencePiece's U+2581 is 3 bytes for 1): so a text of more than
        # max_model_len * this many bytes cannot fit, and is refused before tokenizing.
        self._grammars: GrammarCompiler | None = None
        self.max_token_bytes = max((len(t.encode("utf-8", "replace"))
                                    for t in self.tokenizer.get_vocab()), default=1) or 1

    # ------------------------------------------------------------------ prompts
    def check_text_length(self, texts: list[str], param: str) -> None:
        """400 before tokenizing when ``texts`` hold more bytes than any ``max_model_len``
        tokens can (a multi-MB prompt costs the tokenizer seconds for a certain refusal)."""
        limit = self.card.max_model_len * self.max_token_bytes
        size = sum(len(t.encode("utf-8", "replace")) for t in texts)
        if size > limit:
            raise bad_request(f"{param}: {size} bytes of text cannot fit this model's context "
                              f"length of {self.card.max_model_len} tokens", param)

    def encode_text(self, text: str, param: str = "prompt") -> list[int]:
        """Raw text -> ids (bos added if the family uses one; no chat template). Blocking:
        front doors call it off the event loop."""
        self.check_text_length([text], param)
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                    add_generation_prompt: bool = True,
                    kwargs: dict[str, Any] | None = None) -> list[int]:
        """Render the checkpoint's chat template and tokenize: ``tools`` and ``kwargs``
        (vLLM's ``chat_template_kwargs``) are handed to the template, and the generation
        prompt is added unless ``add_generation_prompt`` is False.

        The template already writes bos where the family wants it, so no special tokens are
        added on top (that would double bos).
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions",
                              "messages")
        self.check_text_length([c for m in messages if isinstance(c := m.get("content"), str)],
                               "messages")
        reserved = sorted(set(kwargs or {}) & {"tokenize", "add_generation_prompt", "tools",
                                               "messages", "conversation", "chat_template"})
        if reserved:
            raise bad_request(f"chat_template_kwargs: {reserved[0]} is set by the request "
                              "itself", "chat_template_kwargs")
        try:
            extra = dict(kwargs or {})
            rendered = self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False,
                add_generation_prompt=add_generation_prompt, **extra)
        except Exception as exc:  # jinja2 TemplateError (raise_exception) and type errors
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise bad_request(f"messages: {msg}", "messages") from None
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def bad_words_ids(self, words: list[str], param: str = "bad_words"
                      ) -> tuple[tuple[int, ...], ...]:
        """vLLM's tokenization of ``bad_words``: each word as is and, when that makes a
        different first token of the same length, with a leading space."""
        out: list[tuple[int, ...]] = []
        for w in words:
            if not w.strip():
                raise bad_request(f"{param} must not hold empty words", param)
            for space in (False, True):
                ids = tuple(self.tokenizer.encode((" " if space else "") + w.lstrip(),
                                                  add_special_tokens=False))
                if ids and (not space or (ids[0] != out[-1][0] and len(ids) == len(out[-1]))):
                    out.append(ids)
        return tuple(out)

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.card.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{param}: token id {bad} is outside the vocabulary "
                              f"[0, {self.card.vocab_size})", param)

    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler for this tokenizer (built on first use)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.card.vocab_size,
                                             [self.tokenizer.eos_token_id or 0])
        return self._grammars

    def decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=True)

    def stream(self, prompt_ids: list[int], stop: tuple[str, ...],
               include_stop: bool = False) -> TextStream:
        return TextStream(IncrementalDetokenizer(self._decoder, prompt_ids=prompt_ids), stop,
                          include_stop)

    def token_str(self, token_id: int) -> str:
        """One token's text as logprobs show it (special tokens included)."""
        return self._decoder.decode([token_id], skip_special_tokens=False)


class TextStream:
    """Generated ids -> text deltas, cut before the first stop string.

    Text that could be the start of a stop string is held back until the next tokens show it
    is not (or the stream ends). After :meth:`push` returns ``stopped=True`` the request is
    over: everything after the stop string is dropped, and the stop string too unless
    ``include_stop`` (vLLM's ``include_stop_str_in_output``).
    """

    def __init__(self, detok: IncrementalDetokenizer, stop: tuple[str, ...] = (),
                 include_stop: bool = False) -> None:
        self._detok = detok
        self._include_stop = include_stop
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._full = ""  # all generated text so far
        self._sent = 0   # chars of _full already released
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self._full[: self._sent]

    def push(self, ids: list[int]) -> str:
        """Add ids; return the newly releasable text (sets :attr:`stopped` on a stop string)."""
        if self.stopped:
            return ""
        self._full += self._detok.push(ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of stream: release what is still held (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self._full += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._full)
        if self._stop:
            # A stop string may straddle released and new text (only its tail was held back).
            start = max(0, self._sent - self._longest + 1)
            hits = [(i, len(s)) for s in self._stop if (i := self._full.find(s, start)) >= 0]
            if hits:
                at, size = min(hits)
                end = at + size if self._include_stop else at
                self.stopped = True
            elif not final:
                end -= self._held_back()
        out = self._full[self._sent : end]
        self._sent = end
        if self.stopped:
            self._full = self._full[:end]
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the unreleased text that starts a stop string."""
        tail = self._full[max(self._sent, len(self._full) - self._longest + 1) :]
        for k in range(len(tail), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0
