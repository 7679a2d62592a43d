"""Offline monolithic generation: the Python API and the ``megascale generate`` sub-command.

All prompts share one paged KV pool sized to fit them (no padding waste). Prompts are prefilled
together in chunks bounded by a token budget, then every live sequence decodes in one batched
forward per step; a finished sequence frees its blocks at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from services.core.batch import build_batch_meta, int64_tensor
from services.core.kv_cache import BlockManager
from services.core.model import MonolithicModel
from services.core.request import FinishReason, SamplingParams
from services.core.sampling import finish_reason, make_generator, sample
from services.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Completion:
    """One prompt's result: generated ``token_ids`` and why it stopped (STOP or LENGTH)."""

    token_ids: list[int]
    finish_reason: FinishReason


def validate_prompts(model: MonolithicModel, prompts: list[list[int]],
                     params: list[SamplingParams]) -> None:
    """One-line UserError for an empty prompt, an id outside the vocab, or a too-long request."""
    cfg = model.cfg
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        if not p:
            raise UserError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                            f"[0, {cfg.vocab_size})")
        if len(p) + sp.max_tokens > cfg.max_position_embeddings:
            raise UserError(f"prompt {i}: {len(p)} prompt tokens + max_tokens {sp.max_tokens} "
                            f"exceed max_position_embeddings ({cfg.max_position_embeddings})")


@torch.inference_mode()
def generate_completions(model: MonolithicModel, prompts: list[list[int]],
                         params: SamplingParams | list[SamplingParams], block_size: int = 16,
                         num_blocks: int | None = None, prefill_token_budget: int = 2048
                         ) -> list[Completion]:
    """Generate for every prompt; see the module docstring for the schedule."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    validate_prompts(model, prompts, params)
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    device = model.device
    bm_probe = BlockManager(1, block_size)
    need = sum(bm_probe.blocks_needed(len(p) + sp.max_tokens) for p, sp in zip(prompts, params,
                                                                               strict=True))
    bm = BlockManager(num_blocks or need, block_size)
    kv = model.new_kv_cache(bm.num_blocks, block_size)
    window = model.cfg.sliding_window
    eos = set(model.cfg.eos_token_ids)
    gens = [make_generator(sp, device) for sp in params]
    outs: list[list[int]] = [[] for _ in prompts]
    reasons: list[FinishReason | None] = [None] * len(prompts)

    def accept(i: int, token: int) -> None:
        outs[i].append(token)
        reasons[i] = finish_reason(params[i], outs[i], eos)
        if reasons[i] is not None:
            bm.free(i)

    def step(ids: list[int], tokens: list[list[int]]) -> None:
        starts = [bm.seq_len(i) for i in ids]
        for i, t in zip(ids, tokens, strict=True):
            bm.append_slots(i, len(t))
        meta = build_batch_meta([bm.block_table(i) for i in ids], starts,
                                [len(t) for t in tokens], block_size, device, window)
        flat = int64_tensor([x for t in tokens for x in t], device)
        logits = model.forward(flat, meta, kv)
        picked = sample(logits, [params[i] for i in ids], [gens[i] for i in ids],
                        [len(outs[i]) for i in ids], eos).tolist()
        for i, t in zip(ids, picked, strict=True):
            accept(i, t)

    # Prefill: group prompts under the token budget (the padded attention mask grows with it).
    group: list[int] = []
    for i, p in enumerate(prompts):
        bm.allocate(i, 0)
        if group and sum(len(prompts[j]) for j in group) + len(p) > prefill_token_budget:
            step(group, [prompts[j] for j in group])
            group = []
        group.append(i)
    step(group, [prompts[j] for j in group])

    # Decode: all live sequences, one token each, one forward per step.
    while live := [i for i in range(len(prompts)) if reasons[i] is None]:
        step(live, [[outs[i][-1]] for i in live])
    return [Completion(o, r or FinishReason.LENGTH) for o, r in zip(outs, reasons, strict=True)]


def generate(model: MonolithicModel, prompts: list[list[int]],
             params: SamplingParams | list[SamplingParams], **kwargs) -> list[list[int]]:
    """Token ids generated for each prompt (see :func:`generate_completions`)."""
    return [c.token_ids for c in generate_completions(model, prompts, params, **kwargs)]


# ----------------------------------------------------------------------------- CLI
def _prompt_ids(text: str) -> tuple[str, list[int]]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids expects comma-separated integers, got {text!r}") from None
    return ("ids", ids)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="offline generation with the monolithic model",
                              description="Generate from one or more prompts (batched together).")
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    p.add_argument("--prompt", dest="prompts", action="append", type=lambda s: ("text", s),
                   help="prompt text (repeatable; needs tokenizer.json)")
    p.add_argument("--prompt-ids", dest="prompts", action="append", type=_prompt_ids,
                   help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: env or 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per prompt")
    p.set_defaults(func=run)


def _load_tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise UserError(f"{path}: cannot load tokenizer ({exc})") from None


def run(args: argparse.Namespace) -> int:
    from services.core.runtime import configure_threads, pick_device

    configure_threads(args.threads)
    if not args.prompts:
        raise UserError("give at least one --prompt or --prompt-ids")
    model_dir = Path(args.model)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    tokenizer = _load_tokenizer(model_dir)
    prompts: list[list[int]] = []
    for kind, value in args.prompts:
        if kind == "ids":
            prompts.append(value)
        elif tokenizer is None:
            raise UserError(f"--prompt needs {model_dir / 'tokenizer.json'}; use --prompt-ids")
        else:
            prompts.append(tokenizer.encode(value).ids)
    model = MonolithicModel.from_pretrained(model_dir, DTYPES[args.dtype], pick_device(args.device))
    results = generate_completions(model, prompts, params, block_size=args.block_size)
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        text = tokenizer.decode(res.token_ids) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"index": i, "prompt_token_ids": prompt, "token_ids": res.token_ids,
                              "text": text, "finish_reason": res.finish_reason}))
        else:
            print(text if text is not None else " ".join(map(str, res.token_ids)))
    sys.stdout.flush()
    return 0
