"""Incremental detokenisation of a streamed token-id sequence.

A byte-level (or byte-fallback) tokenizer can split one multi-byte UTF-8 character across
several tokens: decoding a prefix of the ids then ends in U+FFFD until the rest arrives. The
gateway streams text deltas to clients, so it must emit only *complete* text and never take back
what it sent. :class:`IncrementalDetokenizer` does this with the prefix/read-offset method used
by vLLM and TGI, which works with any tokenizer that has ``decode(ids, skip_special_tokens=...)``
(``tokenizers.Tokenizer`` and every transformers tokenizer):

* ``prefix`` .. ``read`` are ids already emitted, kept as left context so that decoders which
  depend on neighbours (SentencePiece's leading space, byte merges) decode consistently;
* on each push, decode ``ids[prefix:]``; if it is longer than ``decode(ids[prefix:read])`` and
  does not end in U+FFFD, emit the difference and move both offsets forward.

The concatenation of every :meth:`push` result plus :meth:`flush` equals ``decode(all_ids)`` for
byte-level tokenizers. Each push decodes a small window (the ids of the previous emission, kept
as context, plus the pending ones), so cost and memory do not grow with the stream's length.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer", "TokenDecoder"]

_REPLACEMENT = "\ufffd"


class TokenDecoder(Protocol):
    """Anything with a ``decode`` like ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete UTF-8 text deltas.

    Args:
        tokenizer: the decoder; ids it does not know decode to nothing.
        skip_special_tokens: drop special tokens (bos, eos, ``<|im_end|>``) from the text.
        prompt_ids: the prompt's ids; the last ``context_tokens`` of them are used only as left
            context for decoding (they are never emitted).
        context_tokens: how many prompt ids to keep as context (>= 0).

    Not thread-safe: one instance per request stream.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        *,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
        context_tokens: int = 5,
    ) -> None:
        if context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # ids[prefix:read] were emitted (or are prompt context); ids[read:] are pending.
        self._ids: list[int] = _checked(prompt_ids[max(0, len(prompt_ids) - context_tokens) :])
        self._prefix = 0
        self._read = len(self._ids)
        self._parts: list[str] = []
        self._num_tokens = 0

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returned deltas)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def num_tokens(self) -> int:
        """Number of generated ids pushed so far (prompt context excluded)."""
        return self._num_tokens

    @property
    def pending_tokens(self) -> int:
        """Ids pushed but not yet turned into text (an incomplete character, or empty tokens)."""
        return len(self._ids) - self._read

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add one id or several; return the newly completed text ("" if none is complete yet)."""
        new = _checked(token_ids)
        self._ids.extend(new)
        self._num_tokens += len(new)
        if not new:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # incomplete character (or only empty tokens): wait for more ids
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """End of stream: return whatever is still pending, with U+FFFD for incomplete bytes."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        return self._emit(new_text[len(prefix_text) :])

    def _emit(self, delta: str) -> str:
        # The emitted ids become the next left context; older ids are no longer needed.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        if delta:
            self._parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""


def _checked(ids: int | Iterable[int]) -> list[int]:
    """One id or an iterable of ids as plain ints (numpy/torch integers accepted).

    Raises ValueError naming the first bad value (negative, bool, float, str, None, ...).
    """
    if not isinstance(ids, bool):
        try:  # a single id: int, numpy/torch integer scalar
            ids = [operator.index(ids)]  # type: ignore[arg-type]
        except TypeError:
            pass
    try:
        items = list(ids)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"token ids must be non-negative integers, got {ids!r}") from None
    out = []
    for i in items:
        try:
            v = operator.index(i)
        except TypeError:
            v = -1
        if isinstance(i, bool) or v < 0:
            raise ValueError(f"token ids must be non-negative integers, got {i!r}")
        out.append(v)
    return out
