"""What a generation request is, for every role: its id rule, its sampling parameters and their
limits, and why it finished. Torch-free, so the gateway imports it without the model stack.

Every front door (the gateway's REST app and gRPC service, the attention replica's
``Generate``/``GenerateStream``) validates through :class:`SamplingParams` and
:func:`check_request_id`; a bad value raises :class:`InvalidField`, whose message starts with
the field's name (the front doors map it to a 400 / INVALID_ARGUMENT naming the field).
:func:`sampling_from_proto` / :func:`sampling_to_proto` are the one conversion to and from the
wire (``megascale.v1.SamplingParams``), and :class:`FinishReason` is the one list of reasons,
with its wire numbers.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from pathlib import Path

from megascale.v1 import common_pb2
from services.errors import UserError

# ----------------------------------------------------------------------------- limits
MAX_TEMPERATURE = 100.0
GREEDY_TEMPERATURE = 1e-5  # below it a temperature is greedy (dividing by it would overflow)
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRINGS = 16      # stop strings are matched by the gateway (it detokenizes)
MAX_STOP_CHARS = 256
U32_MAX = (1 << 32) - 1    # the wire width of token ids, top_k, max_tokens, min_tokens
U64_MAX = (1 << 64) - 1    # the wire width of seed
MAX_PENALTY = 2.0          # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_REPETITION_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0     # |bias| per token (OpenAI's range)
MAX_LOGIT_BIAS_TOKENS = 300
MAX_BAD_WORDS = 64         # token sequences
MAX_BAD_WORD_TOKENS = 16   # tokens per sequence
MAX_LOGPROBS = 20          # top alternatives per token (OpenAI's top_logprobs limit)
MAX_GRAMMAR_CHARS = 1 << 20

# ------------------------------------------------------------------------------ models
def model_id(model_dir: str | Path) -> str:
    """The name a deployment knows a checkpoint by, the same in every role: its directory's
    name. Replicas and expert nodes register under it and the gateway asks the scheduler for
    it (the gateway's ``--served-model-name`` is only what clients call it)."""
    return Path(model_dir).resolve().name


# ------------------------------------------------------------------------- request ids
REQUEST_ID_MAX_LEN = 128
# The gateway sends attempt N of a request to a replica as "ID.N" (a resumed attempt must not
# collide with the one it replaces), so an id a client gives the gateway leaves room for it.
MAX_ATTEMPTS = 100
CLIENT_REQUEST_ID_MAX_LEN = REQUEST_ID_MAX_LEN - len(f".{MAX_ATTEMPTS - 1}")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


class InvalidField(UserError):
    """A request field is out of range; ``field`` names it and the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_request_id(request_id: str, max_len: int = REQUEST_ID_MAX_LEN,
                     field: str = "request_id") -> str:
    """``request_id`` if it is 1..``max_len`` printable ASCII characters (no spaces)."""
    if not (1 <= len(request_id) <= max_len and _PRINTABLE_ASCII.fullmatch(request_id)):
        raise InvalidField(field, f"{field} must be 1..{max_len} printable ASCII characters "
                           "without spaces")
    return request_id


def attempt_request_id(request_id: str, attempt: int) -> str:
    """The replica-side id of the gateway's ``attempt`` (0-based) at ``request_id``."""
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise ValueError(f"attempt must be in 0..{MAX_ATTEMPTS - 1}, got {attempt}")
    return check_request_id(f"{request_id}.{attempt}")


# ----------------------------------------------------------------------- finish reasons
class FinishReason(enum.StrEnum):
    """Why a request finished; equal to its OpenAI spelling (``"stop"`` ...)."""

    STOP = "stop"      # EOS, a stop token id, or (gateway) a stop string
    LENGTH = "length"  # max_tokens, or the context length
    ABORT = "abort"    # cancelled: Abort, or the client went away
    ERROR = "error"    # the request failed on the replica

    @property
    def proto(self) -> int:
        """The ``megascale.v1.FinishReason`` number."""
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> FinishReason | None:
        """None for FINISH_REASON_UNSPECIFIED (not finished) and unknown numbers."""
        return _FROM_PROTO.get(value)


_TO_PROTO = {r: common_pb2.FinishReason.Value(f"FINISH_REASON_{r.name}") for r in FinishReason}
_FROM_PROTO = {v: r for r, v in _TO_PROTO.items()}


# --------------------------------------------------------------------- sampling params
@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (vLLM semantics), validated at construction.

    temperature 0 (or below GREEDY_TEMPERATURE) = greedy; top_k -1 or 0 = off; top_p 1 = off;
    seed None = random.
    Generation stops after ``max_tokens`` tokens (None = until the context is full; the
    attention replica resolves it when it admits the request), or at an EOS /
    ``stop_token_ids`` token (which is included in the output) unless ``ignore_eos``. Until
    ``min_tokens`` tokens exist, those stopping tokens cannot be sampled (their logits are
    masked; HF's ``min_new_tokens``).

    Logits processing (vLLM's order and formulas, services/core/logits_processors.py):
    ``grammar`` (an llguidance grammar, services/core/structured.py) masks what it does not
    allow, ``bad_words_ids`` bans the last token of a sequence whose other tokens end the
    output, ``logit_bias`` adds to the named tokens' logits, ``repetition_penalty`` (> 1
    discourages) divides positive / multiplies negative logits of tokens seen in prompt or
    output, ``frequency_penalty`` and ``presence_penalty`` subtract ``count`` and ``count > 0``
    times themselves for tokens of the output; then temperature, ``min_p`` (drop tokens below
    ``min_p`` times the top probability), top-k, top-p. ``logprobs`` k returns each sampled
    token's log-probability and the k most likely alternatives (k = 0: the sampled one only),
    from the raw logits (vLLM's default ``raw_logprobs``); ``prompt_logprobs`` k the same for
    every prompt token after the first (each given the tokens before it).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids unique
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None
    grammar: str | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= MAX_TEMPERATURE):
            raise InvalidField("temperature", f"temperature must be in [0, "
                               f"{MAX_TEMPERATURE:g}], got {t}")
        p = self.top_p
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 < p <= 1):
            raise InvalidField("top_p", f"top_p must be in (0, 1], got {p}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= U32_MAX:
            raise InvalidField("top_k", f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        mt = self.max_tokens
        if mt is not None and (not _is_int(mt) or not 1 <= mt <= U32_MAX):
            raise InvalidField("max_tokens", f"max_tokens must be an integer in [1, {U32_MAX}]"
                               f", got {mt}")
        upper = U32_MAX if mt is None else mt
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= upper:
            raise InvalidField("min_tokens", f"min_tokens must be an integer in [0, "
                               f"max_tokens={upper}], got {self.min_tokens}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= U64_MAX):
            raise InvalidField("seed", f"seed must be an unsigned 64-bit integer, got "
                               f"{self.seed!r}")
        ids = tuple(self.stop_token_ids)
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidField("stop_token_ids", f"stop_token_ids holds more than "
                               f"{MAX_STOP_TOKEN_IDS} ids")
        if any(not _is_int(t) or not 0 <= t <= U32_MAX for t in ids):
            raise InvalidField("stop_token_ids", "stop_token_ids must be non-negative token ids")
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), -MAX_PENALTY, MAX_PENALTY)
        r = self.repetition_penalty
        if not (_is_num(r) and 0 < r <= MAX_REPETITION_PENALTY):
            raise InvalidField("repetition_penalty", f"repetition_penalty must be in (0, "
                               f"{MAX_REPETITION_PENALTY:g}], got {r}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        self._check_logit_bias()
        self._check_bad_words()
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
                raise InvalidField(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}], "
                                   f"got {lp!r}")
        g = self.grammar
        if g is not None and (not isinstance(g, str) or not 1 <= len(g) <= MAX_GRAMMAR_CHARS):
            raise InvalidField("grammar", f"grammar must be 1..{MAX_GRAMMAR_CHARS} characters")
        if g is not None and self.min_tokens:  # the grammar may allow only eos
            raise InvalidField("min_tokens", "min_tokens cannot be combined with a grammar "
                               "(structured outputs)")
        if g is not None and self.ignore_eos:  # a complete grammar allows only eos
            raise InvalidField("ignore_eos", "ignore_eos cannot be combined with a grammar "
                               "(structured outputs)")

    def _check_logit_bias(self) -> None:
        pairs = tuple((t, float(b)) if _is_num(b) else (t, b) for t, b in self.logit_bias)
        if len(pairs) > MAX_LOGIT_BIAS_TOKENS:
            raise InvalidField("logit_bias", f"logit_bias holds more than "
                               f"{MAX_LOGIT_BIAS_TOKENS} tokens")
        for t, b in pairs:
            if not _is_int(t) or not 0 <= t <= U32_MAX:
                raise InvalidField("logit_bias", f"logit_bias: {t!r} is not a token id")
            if not (_is_num(b) and math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS):
                raise InvalidField("logit_bias", f"logit_bias: the bias of token {t} must be "
                                   f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {b!r}")
        if len({t for t, _ in pairs}) != len(pairs):
            raise InvalidField("logit_bias", "logit_bias names a token twice")
        object.__setattr__(self, "logit_bias", pairs)

    def _check_bad_words(self) -> None:
        seqs = tuple(tuple(s) for s in self.bad_words_ids)
        if len(seqs) > MAX_BAD_WORDS:
            raise InvalidField("bad_words", f"bad_words holds more than {MAX_BAD_WORDS} words")
        for seq in seqs:
            if not 1 <= len(seq) <= MAX_BAD_WORD_TOKENS:
                raise InvalidField("bad_words", f"bad_words: each word must be 1.."
                                   f"{MAX_BAD_WORD_TOKENS} tokens, got {len(seq)}")
            if any(not _is_int(t) or not 0 <= t <= U32_MAX for t in seq):
                raise InvalidField("bad_words", "bad_words must hold token ids")
        object.__setattr__(self, "bad_words_ids", seqs)

    @property
    def penalized(self) -> bool:
        """Whether any logits processor (penalties, logit_bias, bad words) applies."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias or self.bad_words_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_range(name: str, v: object, lo: float, hi: float) -> None:
    if not (_is_num(v) and math.isfinite(v) and lo <= v <= hi):
        raise InvalidField(name, f"{name} must be in [{lo:g}, {hi:g}], got {v!r}")


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """The wire's defaults -> :class:`SamplingParams` (InvalidField names the bad field).

    ``max_tokens`` 0 means "until the context is full" (None); ``top_k`` 0 means off.
    """
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k or -1, max_tokens=p.max_tokens or None,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=(p.repetition_penalty if p.HasField("repetition_penalty")
                            else 1.0),
        min_p=p.min_p, logit_bias=tuple(sorted(p.logit_bias.items())),
        bad_words_ids=tuple(tuple(w.ids) for w in p.bad_words),
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        grammar=p.grammar or None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None)


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    """:class:`SamplingParams` -> the wire (the inverse of :func:`sampling_from_proto`)."""
    p = common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                  top_k=max(s.top_k, 0), max_tokens=s.max_tokens or 0,
                                  stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos,
                                  min_tokens=s.min_tokens,
                                  presence_penalty=s.presence_penalty,
                                  frequency_penalty=s.frequency_penalty, min_p=s.min_p,
                                  logit_bias=dict(s.logit_bias),
                                  bad_words=[common_pb2.TokenSequence(ids=w)
                                             for w in s.bad_words_ids],
                                  grammar=s.grammar or "")
    if s.seed is not None:
        p.seed = s.seed
    if s.repetition_penalty != 1.0:
        p.repetition_penalty = s.repetition_penalty
    if s.logprobs is not None:
        p.logprobs = s.logprobs
    if s.prompt_logprobs is not None:
        p.prompt_logprobs = s.prompt_logprobs
    return p
