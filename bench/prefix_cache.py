"""Prefix caching: time to first token of requests that share a long prompt prefix, with the
cache on and off, side by side in one run.

Two meshes run at once on the same checkpoint (bench/pingpong.py's shape; each 1 attention
replica on core 0 + 1 expert node on core 1, shm), one with ``--enable-prefix-caching`` and
one with ``--no-enable-prefix-caching``. Each repeat sends both the same request, in
alternating order: the shared prefix (``--prefix-len`` tokens, "a system prompt") plus a
suffix of its own (``--suffix-len``), one output token, so the wall time is its TTFT. One
request with the bare prefix warms each mesh first.

    python bench/prefix_cache.py --prefix-len 1024 --suffix-len 32 --repeats 7 --json pc.json

Prints per repeat both TTFTs; then the medians, their ratio (off / on) and the replica's
prefix-cache hit rate. JSON: ``{"prefix_len", "suffix_len", "ttft_on_ms", "ttft_off_ms",
"speedup", "hit_rate", "machine"}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch
from machine import describe, one_line
from pingpong import SHAPE, scrape

from megascale.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from services.core.demo import write_random_checkpoint
from services.launch.procs import LocalMesh


def ttft(address: str, rid: str, prompt: list[int]) -> float:
    """Wall time of a one-token request (prefill + one sample): its time to first token."""
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with grpc.insecure_channel(address) as ch:
        stub = attention_pb2_grpc.AttentionStub(ch)
        t0 = time.perf_counter()
        for _ in stub.Generate(attention_pb2.GenerateRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=sampling), timeout=600):
            pass
        return time.perf_counter() - t0


def start(model: Path, caching: bool, max_len: int, workdir: Path) -> LocalMesh:
    flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
    return LocalMesh.start(
        model, [list(range(SHAPE["experts"]))], micro_batches=1, transport="shm",
        attention_args=["--metrics-port", "0", "--max-batch-tokens", "512",
                        "--max-model-len", str(max_len), flag],
        expert_args=["--max-batch-tokens", "512"], workdir=workdir,
        attention_cpus="0", expert_cpus="1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    max_len = args.prefix_len + args.suffix_len + 8
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, SHAPE["vocab"], (args.prefix_len,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_checkpoint(Path(tmp) / "model", "mixtral", tokenizer=False,
                                        max_position=max(4096, max_len), **SHAPE)
        meshes = {"on": start(model, True, max_len, Path(tmp) / "on"),
                  "off": start(model, False, max_len, Path(tmp) / "off")}
        try:
            for name, mesh in meshes.items():
                ttft(mesh.attention[0].grpc, f"warm-{name}", prefix)
            times: dict[str, list[float]] = {"on": [], "off": []}
            for r in range(args.repeats):
                suffix = torch.randint(3, SHAPE["vocab"], (args.suffix_len,),
                                       generator=g).tolist()
                order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
                for name in order:
                    times[name].append(ttft(meshes[name].attention[0].grpc, f"r{r}-{name}",
                                            prefix + suffix))
                print(f"repeat {r}: on {1000 * times['on'][-1]:8.1f} ms   "
                      f"off {1000 * times['off'][-1]:8.1f} ms", flush=True)
            got = scrape(meshes["on"].attention[0].info["metrics_port"])
            hits = sum(v for k, v in got.items() if k.startswith("megascale:prefix_cache_hits"))
            queries = sum(v for k, v in got.items()
                          if k.startswith("megascale:prefix_cache_queries"))
        finally:
            for mesh in meshes.values():
                mesh.stop()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    rec = {"prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
           "ttft_on_ms": 1000 * on, "ttft_off_ms": 1000 * off, "speedup": off / on,
           "hit_rate": hits / queries if queries else 0.0, "machine": describe()}
    print(one_line(rec["machine"]))
    print(f"prefix {args.prefix_len} + suffix {args.suffix_len} tokens, "
          f"median TTFT: cache on {rec['ttft_on_ms']:.1f} ms, off {rec['ttft_off_ms']:.1f} ms, "
          f"{rec['speedup']:.2f}x; hit rate {rec['hit_rate']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
