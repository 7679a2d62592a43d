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
    rank: int = 0  # 1 + the tokens more likely than it (0: unknown)


def process(logits: torch.Tensor, params: Sequence[SamplingParams],
            prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
            ) -> torch.Tensor:
    """``logits`` [B, V] with each row's processors applied (a copy when any row has one)."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    logits = logits.clone(memory_format=torch.contiguous_format)  # _penalties views it flat
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


def _keys(seqs: list[Sequence[int]], rows: list[int], V: int, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (row, token) pairs of ``seqs`` (``seqs[j]`` is row ``rows[j]``'s) as flat
    indices ``row * V + token`` into a contiguous [B, V] tensor, and how often each occurs
    (one tensor built from one flat list)."""
    flat = [t for s in seqs for t in s]
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long),
                                     torch.tensor([len(s) for s in seqs], dtype=torch.long))
    keys = row_of * V + torch.tensor(flat, dtype=torch.long).clamp_(0, V - 1)
    return torch.unique(keys.to(device), return_counts=True)


def _penalties(logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams],
               prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> None:
    """vLLM's ``apply_penalties`` on ``rows`` of ``logits`` (contiguous, in place).

    Sparse: only the logits of tokens in a row's history change, so the work is O(history)
    gathers and scatters, not O(vocabulary) passes (the same result as vLLM's dense masks).
    """
    B, V = logits.shape
    dev = logits.device
    flat = logits.view(-1)

    def per_row(name: str, default: float) -> torch.Tensor:  # [B], default off the rows
        vals = [default] * B
        for i in rows:
            vals[i] = getattr(params[i], name)
        return torch.tensor(vals, device=dev, dtype=logits.dtype)

    out_keys, out_counts = _keys([outputs[i] for i in rows], rows, V, dev)
    rep_rows = [i for i in rows if params[i].repetition_penalty != 1.0]
    if rep_rows:
        prompt_keys, _ = _keys([prompts[i] for i in rep_rows], rep_rows, V, dev)
        seen = torch.unique(torch.cat([prompt_keys, out_keys]))
        vals, r = flat[seen], per_row("repetition_penalty", 1.0)[seen // V]
        flat[seen] = torch.where(vals > 0, vals / r, vals * r)
    row_of = out_keys // V
    freq, pres = per_row("frequency_penalty", 0.0), per_row("presence_penalty", 0.0)
    flat[out_keys] -= freq[row_of] * out_counts.to(logits.dtype) + pres[row_of]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` [R] times the row's top probability
    (logits [R, V] already divided by the temperature). ``min_p`` 0 keeps every token."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p[:, None] * probs.amax(-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int | None],
             ranks: bool = False) -> list[TokenLogprobs | None]:
    """Each row's sampled-token log-probability and top ``ks[i]`` alternatives (None: the row
    asked for none), from ``logits`` [B, V] (the raw ones: vLLM's ``raw_logprobs``); with
    ``ranks`` also each token's rank (one more pass over the rows)."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(ks)
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    sub = (logits if len(rows) == len(ks) else logits.index_select(0, idx)).float()
    lse = torch.logsumexp(sub, dim=-1, keepdim=True)  # log-softmax = x - lse, never built
    raw = sub.gather(1, tokens.index_select(0, idx)[:, None])  # [R, 1]
    picked = (raw - lse).squeeze(1).tolist()
    rank = ((sub > raw).sum(-1) + 1).tolist() if ranks else [0] * len(rows)
    kmax = max(ks[i] for i in rows)
    tv = ti = None
    if kmax:
        top_v, top_i = sub.topk(kmax, dim=-1)
        tv, ti = (top_v - lse).tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        k = ks[i]
        out[i] = TokenLogprobs(picked[j], tuple(ti[j][:k]) if k else (),
                               tuple(tv[j][:k]) if k else (), rank[j])
    return out
