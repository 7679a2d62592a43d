"""Per-row logits processors (vLLM semantics), vectorised over the batch.

:func:`process` applies, to the rows that ask for them: bad words, ``logit_bias``, then the
repetition, frequency and presence penalties (vLLM's order and formulas). Each is one batched
tensor operation over the rows that use it; the Python work per step is O(tokens of those rows'
histories), never a loop over the vocabulary. A batch where no row uses any processor is
returned as it is (one attribute test per row). :func:`apply_min_p` and :func:`logprobs` are
the other per-row steps that :func:`services.core.sampling.sample` and the engine call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.core.request import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and the top alternatives (most likely first)."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def process(logits: torch.Tensor, params: Sequence[SamplingParams],
            prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
            ) -> torch.Tensor:
    """``logits`` [B, V] with each row's processors applied (a copy when any row has one)."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    logits = logits.clone()
    V = logits.shape[-1]
    dev = logits.device
    _bad_words(logits, rows, params, outputs)
    bias_r, bias_c, bias_v = [], [], []
    for i in rows:
        for t, b in params[i].logit_bias:
            if t < V:
                bias_r.append(i)
                bias_c.append(t)
                bias_v.append(b)
    if bias_r:
        logits.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_c, device=dev)),
                          torch.tensor(bias_v, device=dev, dtype=logits.dtype), accumulate=True)
    pen = [i for i in rows if params[i].repetition_penalty != 1.0
           or params[i].frequency_penalty or params[i].presence_penalty]
    if pen:
        _penalties(logits, pen, params, prompts, outputs)
    return logits


def _bad_words(logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams],
               outputs: Sequence[Sequence[int]]) -> None:
    """Mask the last id of each bad word whose other ids end the row's output."""
    r, c = [], []
    V = logits.shape[-1]
    for i in rows:
        out = outputs[i]
        for word in params[i].bad_words_ids:
            head = len(word) - 1
            if word[-1] < V and (head == 0 or (len(out) >= head
                                               and list(out[-head:]) == list(word[:-1]))):
                r.append(i)
                c.append(word[-1])
    if r:
        dev = logits.device
        logits[torch.tensor(r, device=dev), torch.tensor(c, device=dev)] = float("-inf")


def _counts(seqs: list[Sequence[int]], V: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token per sequence, [R, V] (one scatter over padded ids)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(width, 1)), V, dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    ids = ids.clamp_(max=V).to(device)
    counts = torch.zeros(len(seqs), V + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :V]


def _penalties(logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams],
               prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> None:
    """vLLM's ``apply_penalties`` on ``rows`` of ``logits`` (in place)."""
    V, dev = logits.shape[-1], logits.device
    idx = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, idx)
    out_counts = _counts([outputs[i] for i in rows], V, dev)
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev,
                       dtype=sub.dtype)[:, None]
    if bool((rep != 1).any()):
        seen = (_counts([prompts[i] for i in rows], V, dev) > 0) | (out_counts > 0)
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev,
                        dtype=sub.dtype)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev,
                        dtype=sub.dtype)[:, None]
    sub = sub - freq * out_counts.to(sub.dtype) - pres * (out_counts > 0).to(sub.dtype)
    logits.index_copy_(0, idx, sub)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` [R] times the row's top probability
    (logits [R, V] already divided by the temperature). ``min_p`` 0 keeps every token."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p[:, None] * probs.amax(-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int | None]
             ) -> list[TokenLogprobs | None]:
    """Each row's sampled-token log-probability and top ``ks[i]`` alternatives (None: the row
    asked for none), from ``logits`` [B, V] (the raw ones: vLLM's ``raw_logprobs``)."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(ks)
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    picked = lp.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1).tolist()
    kmax = max(ks[i] for i in rows)
    top_v, top_i = (lp.topk(kmax, dim=-1) if kmax else (None, None))
    tv = top_v.tolist() if top_v is not None else None
    ti = top_i.tolist() if top_i is not None else None
    for j, i in enumerate(rows):
        k = ks[i]
        out[i] = TokenLogprobs(picked[j], tuple(ti[j][:k]) if k else (),
                               tuple(tv[j][:k]) if k else ())
    return out
