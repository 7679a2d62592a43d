"""MoE routing: token -> (top-k expert ids, gate weights), one implementation for every family.

A :class:`RouterSpec` says how a family turns router logits into a choice; :func:`route` is the
only code that does it. The variants, in transformers' own terms:

=====================  ===========  ====================================================
family                 scoring      selection
=====================  ===========  ====================================================
Mixtral, Qwen3-MoE     softmax      greedy top-k, optional renormalisation
DeepSeek-V2            softmax      ``greedy`` or ``group_limited_greedy`` (best group =
                                    max score; experts outside the ``topk_group`` best of
                                    ``n_group`` groups score 0), times
                                    ``routed_scaling_factor``
DBRX                   softmax      greedy top-k, weights divided by their p-norm
                                    (``moe_normalize_expert_weights``)
Qwen2-MoE, OLMoE       softmax      as Qwen3-MoE
DeepSeek-V3 (Kimi-K2)  sigmoid      ``noaux_tc``: selection on ``score + e_score_correction
                                    _bias`` (bias for selection only), group score = sum of
                                    the group's top-2, non-selected groups -inf; weights
                                    are the unbiased scores, renormalised
                                    (``norm_topk_prob``), times ``routed_scaling_factor``
GLM-4.5                sigmoid      as DeepSeek-V3
MiniMax-M2             sigmoid      as DeepSeek-V3 with one group (``noaux_tc``)
gpt-oss                (none)       top-k of the biased logits, softmax over those k
=====================  ===========  ====================================================

Numerics follow transformers per family: ``logits_float32`` computes the router GEMM on
float32 inputs (DeepSeek), else in the compute dtype then cast (Mixtral, Qwen3);
``weights_float32`` keeps the gate weights in float32 (Mixtral, DeepSeek) instead of rounding
them to the compute dtype (Qwen3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.errors import ConfigError

SCORING = ("softmax", "sigmoid")
METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RouterSpec:
    """How router logits become (ids, weights); validated at construction."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # e_score_correction_bias [E] is added to the scores for selection only (noaux_tc).
    score_bias: bool = False
    logits_float32: bool = False
    weights_float32: bool = False
    # top-k weights divided by their p-norm (DBRX's moe_normalize_expert_weights; None: as
    # norm_topk_prob says)
    topk_norm_p: float | None = None
    # gpt-oss: the router has a bias [E] added to its logits, and the top-k *logits* are
    # selected, then softmaxed among themselves (scoring is ignored)
    logit_bias: bool = False
    topk_softmax: bool = False
    # DBRX: the softmax's output is rounded to the compute dtype before top-k and the
    # normalisation, which then run in that dtype (transformers' order)
    scores_in_compute_dtype: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in SCORING:
            raise ConfigError(f"scoring_func: {self.scoring!r} is not supported "
                              f"(supported: {', '.join(SCORING)})")
        if self.method not in METHODS:
            raise ConfigError(f"topk_method: {self.method!r} is not supported "
                              f"(supported: {', '.join(METHODS)})")
        if self.method != "greedy":
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ConfigError(f"n_group ({self.n_group}) must divide the number of routed "
                                  f"experts ({self.num_experts})")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group ({self.topk_group}) must be in [1, n_group = "
                                  f"{self.n_group}]")
            per_group = self.num_experts // self.n_group
            if self.method == "noaux_tc" and per_group < 2:
                raise ConfigError("n_group: noaux_tc scores a group by its top-2 experts, so "
                                  "every group needs at least 2 experts")
            if self.top_k > self.topk_group * per_group:
                raise ConfigError(f"num_experts_per_tok ({self.top_k}) exceeds the experts in "
                                  f"topk_group ({self.topk_group}) groups of {per_group}")
        if self.routed_scaling_factor <= 0:
            raise ConfigError(f"routed_scaling_factor must be > 0, got "
                              f"{self.routed_scaling_factor}")


def _group_mask(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """[T, E] bool: experts in the ``topk_group`` best groups of each row."""
    T = choice.shape[0]
    grouped = choice.view(T, spec.n_group, spec.num_experts // spec.n_group)
    if spec.method == "noaux_tc":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
    return mask[:, :, None].expand_as(grouped).reshape(T, spec.num_experts)


def route(x: torch.Tensor, router_weight: torch.Tensor, spec: RouterSpec,
          score_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router_weight [E, H] (, score_bias [E]: float32 for ``noaux_tc``, the logit
    bias for ``logit_bias``) -> (topk_ids [T, K] int64, topk_weights [T, K]: float32 when
    ``spec.weights_float32``, else x.dtype)."""
    if spec.topk_softmax:  # gpt-oss: softmax over the chosen logits, in the compute dtype
        logits = F.linear(x, router_weight, score_bias if spec.logit_bias else None)
        top, ids = torch.topk(logits, spec.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        return ids, weights.float() if spec.weights_float32 else weights
    if spec.logits_float32:
        logits = F.linear(x.float(), router_weight.float())
    else:
        logits = F.linear(x, router_weight).float()
    if spec.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = logits.sigmoid()
    if spec.scores_in_compute_dtype:
        scores = scores.to(x.dtype)
    if spec.method == "greedy":
        weights, ids = torch.topk(scores, spec.top_k, dim=-1)
    elif spec.method == "group_limited_greedy":
        masked = scores.masked_fill(~_group_mask(scores, spec), 0.0)
        weights, ids = torch.topk(masked, spec.top_k, dim=-1)
    else:  # noaux_tc: choose on biased scores, weigh with the unbiased ones
        choice = scores if score_bias is None else scores + score_bias
        choice = choice.masked_fill(~_group_mask(choice, spec), float("-inf"))
        ids = torch.topk(choice, spec.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
    if spec.topk_norm_p is not None:
        weights = weights / torch.norm(weights, p=spec.topk_norm_p, dim=-1, keepdim=True)
    elif spec.norm_topk_prob:
        # + 1e-20 as DeepSeek-V3 does: a sigmoid row can sum to ~0; softmax rows never do
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denom + 1e-20 if spec.scoring == "sigmoid" else denom)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return ids, weights if spec.weights_float32 else weights.to(x.dtype)
