"""A/B of two source trees of the disaggregated engine, side by side in one run.

The ping-pong benchmark's figures move by more than many engine changes between runs on a shared
machine, so comparing two runs taken minutes apart says little. This starts one bench/pingpong.py
mesh (1 attention replica on core 0 + 1 expert node on core 1, shm) per (tree, m) on the same
checkpoint and batch, and goes round all of them in every repeat (every other repeat in
reverse order): each figure is measured seconds from its counterpart. The baseline tree is
any checkout of this repository (e.g. ``git worktree add /tmp/base <commit>`` and a copy of
the built ``libm2n/_fast*.so``); its processes run with ``PYTHONPATH`` pointing at it.

    python bench/engine_ab.py --baseline /tmp/base --intermediate 320 --json ab.json

Prints per repeat tok/s, then per tree the median m=2 / m=1 ratio and busy fractions, and the
per-repeat ratio candidate / baseline at every m. JSON: a list of records ``{"tree":
"baseline"|"candidate", "m", "batch", "tokens_per_s", "tokens_per_s_all", "attn_busy",
"expert_busy", "t_a_ms", "t_e_ms"}`` plus ``{"tree": "ratio", "m", "candidate_over_baseline":
[...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
from pathlib import Path

import torch
from pingpong import SHAPE, measure_once, run_batch, start_mesh

from services.core.demo import write_random_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True,
                    help="source tree of the baseline (a checkout of this repository)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=320, help="expert FFN width")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ms", default="1,2")
    ap.add_argument("--stream-interval", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.baseline / "services" / "attention").is_dir():
        ap.error(f"--baseline {args.baseline} is not a checkout of this repository")
    here = Path(__file__).resolve().parents[1] / "libm2n"
    if any(here.glob("_fast*.so")) and not any((args.baseline / "libm2n").glob("_fast*.so")):
        ap.error(f"the baseline has no compiled libm2n C hot path (it would run the slower "
                 f"pure-Python one): cp {here}/_fast*.so {args.baseline}/libm2n/")
    ms = [int(x) for x in args.ms.split(",")]
    trees = {"baseline": {"PYTHONPATH": str(args.baseline.resolve())}, "candidate": {}}
    shape = {**SHAPE, "intermediate": args.intermediate}
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab"], (args.batch, args.prompt_len),
                            generator=g).tolist()
    got: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        model = write_random_checkpoint(work / "model", "mixtral", tokenizer=False, **shape)
        meshes = {(tree, m): stack.enter_context(start_mesh(
                      model, prompts, args.new_tokens, m, work / f"{tree}{m}",
                      stream_interval=args.stream_interval, env=env))
                  for tree, env in trees.items() for m in ms}
        for (tree, m), mesh in meshes.items():
            asyncio.run(run_batch(mesh.attention[0].grpc, prompts, 4, f"warm-{tree}{m}"))
        for r in range(args.repeats):
            # every other repeat in reverse, so neither tree always runs right after the other
            order = list(meshes.items())
            for (tree, m), mesh in order if r % 2 == 0 else reversed(order):
                got.setdefault((tree, m), []).append(
                    measure_once(mesh, prompts, args.new_tokens, m, f"{tree}{m}-{r}"))
            print(f"repeat {r}: " + ", ".join(f"{t} m={m} {v[-1]['decode']:.0f}"
                                              for (t, m), v in got.items()), flush=True)
    med = statistics.median
    records = []
    for (tree, m), runs in got.items():
        records.append({"tree": tree, "m": m, "batch": args.batch,
                        "tokens_per_s": med(x["decode"] for x in runs),
                        "tokens_per_s_all": [x["decode"] for x in runs],
                        "attn_busy": med(x["busy_a"] for x in runs),
                        "expert_busy": med(x["busy_e"] for x in runs),
                        "t_a_ms": 1000 * med(x["t_a"] for x in runs),
                        "t_e_ms": 1000 * med(x["t_e"] for x in runs)})
    for tree in trees:
        for m in ms:
            runs = got[(tree, m)]
            line = (f"{tree:>9} m={m}: {med(x['decode'] for x in runs):7.0f} tok/s, busy "
                    f"{med(x['busy_a'] for x in runs):.0%} / {med(x['busy_e'] for x in runs):.0%}")
            if m != 1 and 1 in ms:
                ratios = [a["decode"] / b["decode"] for a, b in zip(runs, got[(tree, 1)],
                                                                    strict=True)]
                line += (f", m={m}/m=1 per repeat median {med(ratios):.2f}x "
                         f"[{min(ratios):.2f} .. {max(ratios):.2f}]")
            print(line)
    for m in ms:
        ratios = [a["decode"] / b["decode"] for a, b in zip(got[("candidate", m)],
                                                            got[("baseline", m)], strict=True)]
        records.append({"tree": "ratio", "m": m, "candidate_over_baseline": ratios})
        print(f"candidate / baseline at m={m} per repeat: median {med(ratios):.2f}x "
              f"[{min(ratios):.2f} .. {max(ratios):.2f}]")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
