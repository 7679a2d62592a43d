"""Cost of the per-row sampling options on one batch of logits (CPU, one thread by default).

What a decode step's sampling costs with no option (the price every request pays), with every
row penalised (repetition + frequency + presence + a logit bias, histories of ``--prompt`` +
``--output`` tokens), with logprobs (top 5, and the sampled token's only), and a grammar mask
on an eighth of the rows (the masks themselves are computed off the critical path in the
engine, so this is the sampling step's share: applying them).

    python bench/sampling_options.py --batch 256 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from services.core.logits_processors import logprobs
from services.core.request import SamplingParams
from services.core.sampling import sample


def timed(f, repeats: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, V = args.batch, args.vocab
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g)
    prompts = [torch.randint(0, V, (args.prompt,), generator=g).tolist() for _ in range(B)]
    outputs = [torch.randint(0, V, (args.output,), generator=g).tolist() for _ in range(B)]
    plain = [SamplingParams(temperature=0)] * B
    pen = [SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5,
                          presence_penalty=0.5, logit_bias=((5, 1.0),))] * B
    tokens = torch.zeros(B, dtype=torch.long)
    allowed = torch.rand(B // 8, V, generator=g) > 0.5  # an eighth of the rows
    r = args.repeats
    res = {
        "batch": B, "vocab": V, "threads": args.threads,
        "plain_ms": timed(lambda: sample(logits, plain, [None] * B, [0] * B, (),
                                         prompts=prompts, outputs=outputs), r),
        "penalised_ms": timed(lambda: sample(logits, pen, [None] * B, [0] * B, (),
                                             prompts=prompts, outputs=outputs), r),
        "logprobs_top5_ms": timed(lambda: logprobs(logits, tokens, [5] * B), r),
        "logprobs_top0_ms": timed(lambda: logprobs(logits, tokens, [0] * B), r),
        "grammar_mask_eighth_ms": timed(lambda: sample(
            logits, plain, [None] * B, allowed=allowed, allowed_rows=range(0, B, 8)), r),
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
