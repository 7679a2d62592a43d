"""Sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator.

Each request owns a ``torch.Generator``; its draws depend only on its own logits and seed, so a
seeded request reproduces the same tokens whatever it is batched with.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Container, Sequence

import torch

from services.core.logits_processors import apply_min_p, process
from services.core.request import FinishReason, SamplingParams


def make_generator(params: SamplingParams, device: str | torch.device = "cpu"
                   ) -> torch.Generator:
    """The request's own generator: seeded from ``params.seed``, else at random."""
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return g


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                        ) -> torch.Tensor:
    """Mask logits [B, V] outside each row's top-k (k<=0: off) and nucleus top-p, vectorised."""
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    rank = torch.arange(V, device=logits.device)[None, :]
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # keep a token while the mass before it is < top_p (the top token is always kept)
    mass_before = probs.cumsum(-1) - probs
    drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


_ARGMAX_CHUNK = 64


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, -1)`` for logits [B, V], same result (first index of the max;
    NaN counts as the max), faster on CPU.

    PyTorch's CPU argmax reduction is not vectorised: on this project's machine it takes
    0.55 ms for [512, 1024] and 16 ms for [512, 32000], against 0.055 ms for ``amax``. So on
    CPU the rows are cut into chunks of 64: the (vectorised) max of every chunk picks the first
    chunk holding the row's max, and argmax runs only inside that chunk (0.20 / 4.2 ms).
    """
    B, V = logits.shape
    if logits.device.type != "cpu" or V % _ARGMAX_CHUNK or V <= _ARGMAX_CHUNK:
        return torch.argmax(logits, dim=-1)
    chunks = logits.reshape(B, V // _ARGMAX_CHUNK, _ARGMAX_CHUNK)  # [B, C, 64]
    first = chunks.amax(-1).argmax(-1)                           # [B] chunk of the first max
    within = chunks[torch.arange(B), first].argmax(-1)           # [B] index inside it
    return first * _ARGMAX_CHUNK + within


def _mask_stops(logits: torch.Tensor, params: Sequence[SamplingParams],
                output_lens: Sequence[int], eos_ids: Collection[int]) -> torch.Tensor:
    """``logits`` with each row's stopping tokens at -inf while it is short of ``min_tokens``
    (a copy only when some row needs it)."""
    rows, cols = [], []
    for i, (p, n) in enumerate(zip(params, output_lens, strict=True)):
        if n < p.min_tokens:
            stops = set(p.stop_token_ids) if p.ignore_eos else {*p.stop_token_ids, *eos_ids}
            stops = [t for t in stops if 0 <= t < logits.shape[-1]]
            rows += [i] * len(stops)
            cols += stops
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = (
        float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None],
           output_lens: Sequence[int] | None = None, eos_ids: Collection[int] = (), *,
           prompts: Sequence[Sequence[int]] | None = None,
           outputs: Sequence[Sequence[int]] | None = None,
           allowed: torch.Tensor | None = None,
           allowed_rows: Sequence[int] | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] -> [B] int64.

    ``allowed`` (bool [B, V], a grammar's mask; or [R, V] for the rows ``allowed_rows``)
    masks what it does not allow. ``output_lens``
    (tokens each row's request has generated so far) enables ``min_tokens``: rows short of it
    cannot pick a stop token id or, unless ``ignore_eos``, an ``eos_ids`` token. With
    ``prompts`` and ``outputs`` (each row's token history) the logits processors run
    (bad words, logit_bias, penalties: services/core/logits_processors.py). Greedy rows take
    the argmax. Sampled rows are filtered (temperature, min-p, top-k, top-p) in one batched
    pass, then draw with their own generator (one draw per row: that is what makes a
    request's tokens independent of its batch-mates).
    """
    if allowed is not None and allowed_rows is not None:
        idx = torch.tensor(list(allowed_rows), device=logits.device)
        logits = logits.index_copy(0, idx, logits.index_select(0, idx).masked_fill(
            ~allowed, float("-inf")))
    elif allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if output_lens is not None:
        logits = _mask_stops(logits, params, output_lens, eos_ids)
    if prompts is not None and outputs is not None:
        logits = process(logits, params, prompts, outputs)
    out = greedy_argmax(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, idx).float()
    temp = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    sub = sub / temp[:, None]
    min_p = [params[i].min_p for i in rows]
    if any(min_p):
        sub = apply_min_p(sub, torch.tensor(min_p, device=logits.device))
    top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
    probs = torch.softmax(_filter_top_k_top_p(sub, top_k, top_p), dim=-1)
    # A row whose distribution is not one (non-finite logits from its own request) keeps its
    # argmax instead of failing the draw, and with it every request of the batch.
    usable = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
    for j, i in enumerate(rows):
        if usable[j]:
            out[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
    return out


def finish_reason(params: SamplingParams, output: Sequence[int], eos_ids: Container[int]
                  ) -> FinishReason | None:
    """Why a request with this ``output`` stops now (STOP or LENGTH), or None to go on.

    The last token stops the request when it is a stop token id, or an EOS id and not
    ``ignore_eos``; reaching ``max_tokens`` (resumed tokens count) ends it with "length".
    """
    if output:
        last = output[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
            return FinishReason.STOP
    if params.max_tokens is not None and len(output) >= params.max_tokens:
        return FinishReason.LENGTH
    return None
