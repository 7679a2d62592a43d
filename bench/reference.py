"""Reference-path benchmark: our offline ``generate`` vs ``transformers.generate``.

Same random demo checkpoint, same prompts (lengths vary, so transformers left-pads), greedy,
``--new-tokens`` new tokens per prompt (EOS ignored by both), float32, torch threads fixed.
Both implementations run side by side in one process, alternating per repeat; the figure is the
median over repeats of generated tokens / wall time (prefill included, identical work for both).
Each run also records the process CPU time it used: on a shared machine, wall time includes
time stolen by other processes, CPU time mostly does not, so the CPU-time ratio is the steadier
figure (both are printed; the wall-time ratio is the headline). Prints a table with the ratios
and, with ``--json PATH``, writes a list of records::

    {"impl": "megascale" | "transformers", "batch": B, "new_tokens": N, "tokens_per_s": x,
     "seconds": [...], "cpu_seconds": [...], "tokens_per_cpu_s": y, "threads": t,
     "device": "cpu", "machine": {"cpu": ..., "cpu_family": ..., ...}}  (bench/machine.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, one_line

from services.core.runtime import configure_threads


def _prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 49, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _run_ours(model, prompts, new_tokens: int) -> tuple[float, float]:
    from services.core.generate import generate
    from services.core.request import SamplingParams

    t0, c0 = time.perf_counter(), time.process_time()
    out = generate(model, prompts, SamplingParams(temperature=0, max_tokens=new_tokens,
                                                  ignore_eos=True))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(o) == new_tokens for o in out)
    return dt, dc


def _run_hf(model, prompts, new_tokens: int) -> tuple[float, float]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers expects for decoder-only
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == width + new_tokens
    return dt, dc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--family", default="mixtral", choices=["mixtral", "qwen3_moe"])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a fresh demo model)")
    ap.add_argument("--quick", action="store_true", help="2 repeats (finishes in < 3 minutes)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    configure_threads(args.threads)  # threads + allocator, as every megascale process
    repeats = 2 if args.quick else args.repeats

    from transformers import AutoModelForCausalLM

    from services.core.demo import write_random_checkpoint
    from services.core.model import MonolithicModel

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = write_random_checkpoint(Path(tmp.name) / "m", args.family, tokenizer=False)
    ours = MonolithicModel.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    vocab = ours.cfg.vocab_size

    records = []
    machine = describe()
    print(one_line(machine))
    print(f"{'batch':>5} {'megascale tok/s':>16} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'spread':>12} {'cpu-time ratio':>15}")
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = _prompts(batch, vocab, seed=batch)
        _run_ours(ours, prompts, 4)  # warm-up both paths
        _run_hf(hf, prompts, 4)
        times: dict[str, list[float]] = {"megascale": [], "transformers": []}
        cpu: dict[str, list[float]] = {"megascale": [], "transformers": []}
        for _ in range(repeats):  # alternate so both see the same machine noise
            for impl, fn, model in (("megascale", _run_ours, ours), ("transformers", _run_hf, hf)):
                dt, dc = fn(model, prompts, args.new_tokens)
                times[impl].append(dt)
                cpu[impl].append(dc)
        tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
        tpc = {k: batch * args.new_tokens / statistics.median(v) for k, v in cpu.items()}
        for impl, v in times.items():
            records.append({"impl": impl, "batch": batch, "new_tokens": args.new_tokens,
                            "tokens_per_s": round(tps[impl], 2), "seconds": v,
                            "cpu_seconds": cpu[impl], "tokens_per_cpu_s": round(tpc[impl], 2),
                            "threads": args.threads, "device": "cpu",
                            "machine": machine})
        ratio = tps["megascale"] / tps["transformers"]
        # spread: the per-repeat ratios (run i of ours vs run i of transformers), min..max
        pairs = [t / o for o, t in zip(times["megascale"], times["transformers"], strict=True)]
        spread = f"{min(pairs):.2f}..{max(pairs):.2f}"
        cpu_ratio = tpc["megascale"] / tpc["transformers"]
        print(f"{batch:>5} {tps['megascale']:>16.1f} {tps['transformers']:>19.1f} {ratio:>5.2f}x "
              f"{spread:>12} {cpu_ratio:>14.2f}x", flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(records, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
