"""Ping-pong pipeline benchmark: disaggregated decode throughput for m = 1..4, side by side with
the monolithic reference path and ``transformers.generate`` on the same checkpoint and batch.

Real processes: one attention replica pinned to core 0 and one expert node pinned to core 1
(one torch thread each), talking over libm2n shm. The checkpoint is shaped so that attention and
expert time per micro-batch are close (T_a ≈ T_e), which is when ping-pong pays most: the expert
FFN width is picked in-process, then refined on short served m=2 runs (:func:`calibrate_served`).

Decode throughput of every implementation is measured the same way: wall time of a batch with
N new tokens minus wall time of the same batch with 1 new token (the prefill), over B x (N - 1)
tokens; medians over repeats. Busy fractions come from each process's Prometheus counters over
the N-token run.

    python bench/pingpong.py --json bench/results/pingpong.json --png docs/img/pingpong_timeline.png
    python bench/pingpong.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

import grpc
import torch
from machine import describe, one_line
from prometheus_client.parser import text_string_to_metric_families

from megascale.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from services.core.demo import write_random_checkpoint
from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.request import SamplingParams
from services.core.runtime import configure_threads
from services.launch.procs import LocalMesh

# hidden 1024 at batch 512: per token a layer computes ~2.9x as long as at hidden 512 while it
# moves 2x the bytes over libm2n, and the per-request Python at each lane step is spread over
# half the tokens, so transfer and host work weigh less against compute. Real MoE models (hidden
# >= 4096) sit further that way still. --hidden 512 --batch 1024 gives a smaller, more
# transfer- and host-bound shape.
SHAPE = dict(layers=8, hidden=1024, intermediate=224, experts=8, top_k=2, heads=8, kv_heads=2,
             vocab=1024, seed=5)
CANDIDATE_INTERMEDIATE = tuple(range(64, 1025, 32))  # expert FFN widths the calibration tries
# New tokens per served calibration probe. Busy fractions are (N-token run - 1-token run) /
# wall: with 16 tokens one slow prefill can read as over 100% busy.
PROBE_TOKENS = 32
_T0 = time.perf_counter()


def phase(name: str) -> None:
    """Progress line with the time since start: the run's phases differ by machine."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {name}", flush=True)


def calibrate(hidden: int, tokens: int, context: int, workdir: Path) -> tuple[int, float, float]:
    """Pick the expert FFN width whose expert time per micro-batch of ``tokens`` tokens is
    closest to the attention time (T_a ≈ T_e, where ping-pong pays most), measured in-process
    on one thread with the real core layers (the planner's profiled work, see
    services/planner/corun.py). Returns (intermediate, T_a ms, T_e ms)."""
    from services.core.model import AttentionSide, ExpertSide
    from services.planner import corun

    configure_threads(1)

    def median_ms(fn, n: int = 15) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    layers = range(SHAPE["layers"])
    state: dict = {}
    t_e: dict[int, float] = {}

    def expert_ms(inter: int) -> float:
        if inter not in t_e:
            shape = {**SHAPE, "hidden": hidden, "intermediate": inter}
            path = write_random_checkpoint(workdir / f"cal-{inter}", "mixtral", tokenizer=False,
                                           **shape)
            experts = ExpertSide.from_pretrained(path)
            if not state:  # attention weights do not depend on the FFN width: measure once
                attn = AttentionSide.from_pretrained(path)
                batch = corun.decode_batch(attn, tokens, context)
                # Every layer in turn, as a decode step does: weights only as hot as served.
                state["t_a"] = median_ms(partial(corun.attention_pass, attn, layers,
                                                 batch)) / len(layers)
                with torch.inference_mode():
                    state["mi"] = attn.attention_block(0, batch.hidden, batch.meta, batch.kv)
            mi = state["mi"]
            t_e[inter] = median_ms(partial(corun.expert_pass, experts, layers, mi.normed,
                                           mi.topk_ids, mi.topk_weights)) / len(layers)
        return t_e[inter]

    # T_e grows with the width: bisect for the first width whose T_e passes T_a, then keep
    # the closer of it and the one below (a handful of probes out of the candidates).
    lo, hi = 0, len(CANDIDATE_INTERMEDIATE) - 1
    expert_ms(CANDIDATE_INTERMEDIATE[hi])  # measures T_a too
    while lo < hi:
        mid = (lo + hi) // 2
        if expert_ms(CANDIDATE_INTERMEDIATE[mid]) > state["t_a"]:
            hi = mid
        else:
            lo = mid + 1
    near = CANDIDATE_INTERMEDIATE[max(0, lo - 1):lo + 1]
    inter = min(near, key=lambda i: abs(expert_ms(i) - state["t_a"]))
    return inter, state["t_a"], t_e[inter]


def calibrate_served(start: int, prompts: list[list[int]], workdir: Path,
                     stream_interval: int, api: str) -> tuple[int, float, float, float, float]:
    """Refine the in-process pick on the served pair: probe short m=2 runs from ``start``
    towards the balance and keep the FFN width at which the two processes are equally busy.

    Busy time, not T_a vs T_e per call: besides its layers, the replica spends each lane step
    on the LM head, sampling and batch bookkeeping (~7 ms per 256-token lane step at the
    default shape, ~1 ms per layer call), and its gRPC and libm2n threads share its core
    (served T_a runs 10–30% above in-process). Balancing per-call T_a and T_e therefore leaves
    the expert node idler than the replica at m=2 (by ~6 points of busy time), and the m=2
    step attention-bound. The probes stream tokens as the measured runs do
    (``stream_interval``, ``api``): per-token streaming loads the replica's core.
    Returns (intermediate, served T_a ms, served T_e ms, replica busy, node busy)."""
    i = CANDIDATE_INTERMEDIATE.index(start)
    best, step = None, 0
    while 0 <= i < len(CANDIDATE_INTERMEDIATE):
        inter = CANDIDATE_INTERMEDIATE[i]
        path = write_random_checkpoint(workdir / f"served-{inter}", "mixtral", tokenizer=False,
                                       **{**SHAPE, "intermediate": inter})
        with start_mesh(path, prompts, PROBE_TOKENS, 2, workdir / f"probe-{inter}",
                        stream_interval=stream_interval) as mesh:
            asyncio.run(run_batch(mesh.attention[0].grpc, prompts, 4, "warm", api))
            # two probes of 31 decode steps each: with fewer, one slow step moved the pick
            got = [measure_once(mesh, prompts, PROBE_TOKENS, 2, f"probe{r}", api)
                   for r in range(2)]
        row = (inter, *(statistics.median(g[k] for g in got)
                        for k in ("t_a", "t_e", "busy_a", "busy_e")))
        print(f"  probe: intermediate {inter}: T_a {1000 * row[1]:.2f} ms, T_e "
              f"{1000 * row[2]:.2f} ms, busy {row[3]:.0%} / {row[4]:.0%}", flush=True)
        if best is None or abs(row[4] - row[3]) < abs(best[4] - best[3]):
            best = row
        direction = 1 if row[4] < row[3] else -1  # node idler than the replica: widen
        if step and direction != step:
            break  # crossed the balance
        step = direction
        i += direction
    inter, t_a, t_e, busy_a, busy_e = best
    return inter, 1000 * t_a, 1000 * t_e, busy_a, busy_e


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


async def run_batch(address: str, prompts: list[list[int]], new_tokens: int, tag: str,
                    api: str = "stream") -> float:
    """Submit every prompt at once, wait for all; returns the wall time. ``api`` "stream": all
    requests over one ``GenerateStream`` call, as the gateway sends them; "generate": one
    ``Generate`` call per request (one gRPC message per request and event)."""
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = attention_pb2_grpc.AttentionStub(ch)

        async def one(i: int, p: list[int]) -> int:
            req = attention_pb2.GenerateRequest(request_id=f"{tag}-{i}", prompt_token_ids=p,
                                                sampling=sampling)
            n = 0
            async for ev in stub.Generate(req, timeout=600):
                n += len(ev.token_ids)
                if ev.error_message:
                    raise RuntimeError(ev.error_message)
            return n

        async def stream() -> list[int]:
            def requests():
                for i, p in enumerate(prompts):
                    yield attention_pb2.GenerateStreamRequest(submit=attention_pb2.StreamSubmit(
                        request=attention_pb2.GenerateRequest(
                            request_id=f"{tag}-{i}", prompt_token_ids=p, sampling=sampling)))

            counts = [0] * len(prompts)
            async for msg in stub.GenerateStream(requests(), timeout=600):
                for se in msg.events:
                    if se.rejected_code or se.event.error_message:
                        raise RuntimeError(se.rejected_message or se.event.error_message)
                    counts[int(se.request_id.rsplit("-", 1)[1])] += len(se.event.token_ids)
            return counts

        t0 = time.perf_counter()
        if api == "stream":
            counts = await stream()
        else:
            counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    assert all(c == new_tokens for c in counts), counts
    return wall


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def start_mesh(model: Path, prompts: list[list[int]], new_tokens: int, m: int, workdir: Path,
               timeline_dir: Path | None = None, stream_interval: int = 1,
               env: dict[str, str] | None = None) -> LocalMesh:
    """One attention replica (core 0) + one expert node (core 1) at ``m`` micro-batches;
    ``env`` is added to the processes' environment."""
    env = dict(env or {})
    if timeline_dir:
        env["MEGASCALE_TIMELINE"] = str(timeline_dir)
    batch = len(prompts)
    # one step may carry every prompt at once; a dispatch slot must hold that many rows
    step_tokens = max(512, batch * len(prompts[0]))
    # KV blocks for every request at full length (+1 block each for the partial last one), so
    # the whole batch decodes together: no request waits for blocks or is preempted.
    num_blocks = batch * (-(-(len(prompts[0]) + new_tokens) // 16) + 1)
    return LocalMesh.start(
        model, [list(range(SHAPE["experts"]))], micro_batches=m, transport="shm",
        attention_args=["--metrics-port", "0", "--max-batch-tokens", str(step_tokens),
                        "--max-num-seqs", str(max(64, batch)),
                        "--num-blocks", str(num_blocks), "--block-size", "16",
                        "--stream-interval", str(stream_interval)],
        expert_args=["--metrics-port", "0", "--max-batch-tokens", str(step_tokens)],
        workdir=workdir, env=env, attention_cpus="0", expert_cpus="1")


def measure_once(mesh: LocalMesh, prompts: list[list[int]], new_tokens: int, m: int,
                 tag: str, api: str = "stream") -> dict:
    """One repeat on a running mesh. Decode-only figures: everything measured over the N-token
    run minus the same measured over the 1-token (prefill-only) run of the same batch (the
    delivery delay: the mean over the N-token run's events)."""
    address = mesh.attention[0].grpc
    a_port = mesh.attention[0].info["metrics_port"]
    e_port = mesh.experts[0].info["metrics_port"]
    s0 = (scrape(a_port), scrape(e_port))
    prefill = asyncio.run(run_batch(address, prompts, 1, f"p{tag}", api))
    s1 = (scrape(a_port), scrape(e_port))
    full = asyncio.run(run_batch(address, prompts, new_tokens, f"n{tag}", api))
    s2 = (scrape(a_port), scrape(e_port))

    def window(key: str, side: int) -> float:
        return delta(s2[side], s1[side], key) - delta(s1[side], s0[side], key)

    wall = full - prefill
    attn_s = window("megascale:attention_compute_seconds_sum", 0)
    exp_s = window("megascale:expert_compute_seconds_sum", 1)
    steps = max(1.0, window("megascale:step_duration_seconds_count", 0))
    key = "megascale:m2n_latency_seconds_{}|direction=round_trip"
    # Lane steps: each of the m lanes steps on its own, one micro-batch per lane step; a round
    # (every lane one step) is what a step-synchronous engine would call one step.
    return {"decode": len(prompts) * (new_tokens - 1) / wall,
            "busy_a": attn_s / wall, "busy_e": exp_s / wall,
            "step_ms": 1000 * window("megascale:step_duration_seconds_sum", 0) / steps,
            "loop_ms": 1000 * wall * m / steps,
            "t_a": attn_s / (steps * SHAPE["layers"]),
            "t_e": exp_s / max(1.0, window("megascale:expert_compute_seconds_count", 1)),
            "rtt": window(key.format("sum"), 0) / max(1.0, window(key.format("count"), 0)),
            # deferred delivery (services/attention/engine.py): engine emit -> gRPC stream
            "delivery": (delta(s2[0], s1[0], "megascale:token_delivery_delay_seconds_sum")
                         / max(1.0, delta(s2[0], s1[0],
                                          "megascale:token_delivery_delay_seconds_count")))}


def bench_disaggregated(model: Path, prompts: list[list[int]], new_tokens: int, ms: list[int],
                        repeats: int, workdir: Path, stream_interval: int = 1,
                        api: str = "stream") -> list[dict]:
    """Every m's mesh runs at once (idle ones sleep); the repeats go round the m values, so
    each m is measured minutes apart at most and the per-repeat ratio to m=1 is side by side
    (``vs_m1_all``). This machine's speed drifts between runs by more than many effects."""
    samples: dict[int, list[dict]] = {m: [] for m in ms}
    with contextlib.ExitStack() as stack:
        meshes = {m: stack.enter_context(start_mesh(model, prompts, new_tokens, m,
                                                    workdir / f"m{m}",
                                                    stream_interval=stream_interval))
                  for m in ms}
        for m, mesh in meshes.items():
            asyncio.run(run_batch(mesh.attention[0].grpc, prompts, 4, f"warm{m}", api))
        for r in range(repeats):
            # Odd rounds go round the m values backwards (m=1 m=2 ... then ... m=2 m=1): a
            # drift of the machine's speed over a round then favours no m in the medians.
            for m in (ms if r % 2 == 0 else ms[::-1]):
                samples[m].append(measure_once(meshes[m], prompts, new_tokens, m, f"{m}-{r}",
                                               api))
    med = statistics.median
    records = []
    for m, got in samples.items():
        col = {k: [g[k] for g in got] for k in got[0]}
        rec = {"impl": "disaggregated", "m": m, "batch": len(prompts), "new_tokens": new_tokens,
               "tokens_per_s": med(col["decode"]), "tokens_per_s_all": col["decode"],
               "attn_busy": med(col["busy_a"]), "expert_busy": med(col["busy_e"]),
               "t_a_ms": 1000 * med(col["t_a"]), "t_e_ms": 1000 * med(col["t_e"]),
               "rtt_ms": 1000 * med(col["rtt"]),
               # T_c estimate: the round trip minus the expert's compute, per direction (it
               # also holds any queueing at the expert node behind other micro-batches)
               "t_c_ms": 1000 * max(0.0, med(col["rtt"]) - med(col["t_e"])) / 2,
               "stream_interval": stream_interval, "api": api, "step_ms": med(col["step_ms"]),
               "loop_ms": med(col["loop_ms"]), "delivery_ms": 1000 * med(col["delivery"])}
        if 1 in samples:  # per-repeat ratio to m=1, measured in the same round
            rec["vs_m1_all"] = [a["decode"] / b["decode"]
                                for a, b in zip(got, samples[1], strict=True)]
        records.append(rec)
    return records


def in_process_decode(impl: str, generate_fn, batch: int, new_tokens: int,
                      repeats: int) -> dict:
    """Decode tokens/s of an in-process baseline: T(new_tokens) - T(1 token), as above."""

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        generate_fn(n)
        return time.perf_counter() - t0

    timed(4)
    decode = []
    for _ in range(repeats):
        p, f = timed(1), timed(new_tokens)
        decode.append(batch * (new_tokens - 1) / (f - p))
    return {"impl": impl, "m": 0, "batch": batch, "new_tokens": new_tokens,
            "tokens_per_s": statistics.median(decode), "tokens_per_s_all": decode,
            "attn_busy": None, "expert_busy": None}


def bench_monolithic(model: Path, prompts: list[list[int]], new_tokens: int,
                     repeats: int) -> dict:
    configure_threads(1)
    mono = MonolithicModel.from_pretrained(model)
    return in_process_decode("monolithic", lambda n: generate(
        mono, prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)),
        len(prompts), new_tokens, repeats)


def bench_transformers(model: Path, prompts: list[list[int]], new_tokens: int,
                       repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    configure_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)  # equal-length prompts: no padding

    def run(n: int) -> None:
        with torch.no_grad():
            hf.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    return in_process_decode("transformers", run, len(prompts), new_tokens, repeats)


def planner_predictions(model: Path, batch: int, context: int, ms: list[int]) -> list[dict]:
    """The deployment planner's closed loop: profile this machine with the real core layers on
    the benchmark's checkpoint, then predict decode tokens/s for each m (issue: within 25%)."""
    from services.planner.models import load_model
    from services.planner.profile import predict_local, profile_checkpoint

    shape = load_model(str(model))
    sizes = sorted({max(1, batch // k) for k in (4, 3, 2, 1)})
    profile = profile_checkpoint(str(model), shape, seq_len=context, batches=tuple(sizes))
    out = []
    for m in ms:
        pred = predict_local(profile, shape, batch, m)
        out.append({"impl": "planner", "m": m, "batch": batch, "new_tokens": None,
                    "tokens_per_s": pred["tokens_per_s"], "attn_busy": None,
                    "expert_busy": None, "prediction": pred,
                    "profile": {"attention_points": profile.attention_points,
                                "expert_points": profile.expert_points,
                                **{k: v for k, v in profile.extra.items()
                                   if "_points" in k and not isinstance(v, str)}}})
    return out


def plot_timeline(timeline_dir: Path, png: Path, batch: int) -> None:
    """Draw one steady-state decode step: attention compute / wait vs expert compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [json.loads(x) for x in (timeline_dir / "attention-0.jsonl").read_text().splitlines()]
    expert = [json.loads(x) for x in (timeline_dir / "expert-0.jsonl").read_text().splitlines()]
    # One steady-state decode step of lane 0 (one token per request: at most batch / 2 at m=2)
    # and every lane's intervals inside its span: the lanes overlap, that is the pipeline.
    lane0 = [s for s in steps if s["lane"] == 0 and s["tokens"] <= batch]
    step = lane0[len(lane0) // 2]
    t0, t1 = step["start"], step["start"] + step["wall"]
    fig, ax = plt.subplots(figsize=(12, 2.8))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for rec in steps:
        for kind, _layer, lane, a, b in rec["intervals"]:
            if b < t0 or a > t1:
                continue
            if kind == "attn":
                ax.barh(1, (b - a) * 1e3, left=(a - t0) * 1e3, color=colors[lane % 4],
                        edgecolor="k", linewidth=0.3)
            else:
                ax.barh(1, (b - a) * 1e3, left=(a - t0) * 1e3, color="lightgrey", hatch="//")
    for ev in expert:
        if ev["end"] >= t0 and ev["start"] <= t1:
            ax.barh(0, (ev["end"] - ev["start"]) * 1e3, left=(ev["start"] - t0) * 1e3,
                    color="tab:purple", edgecolor="k", linewidth=0.3)
    ax.set_xlim(0, (t1 - t0) * 1e3)
    ax.set_yticks([0, 1], ["expert node", "attention"])
    ax.set_xlabel("ms since lane 0's step start (colours: lane = micro-batch; hatched: waiting "
                  "for combine)")
    ax.set_title(f"one decode step of lane 0, m=2 ({step['tokens']} tokens per lane)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None,
                    help="requests decoded together (default 512; 256 with --quick); m=2 "
                         "gives micro-batches of batch/2 tokens (smaller micro-batches run "
                         "this CPU's kernels less efficiently per token; see "
                         "docs/BENCHMARKS.md section 3)")
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    ap.add_argument("--layers", type=int, default=SHAPE["layers"])
    ap.add_argument("--intermediate", type=int, default=None,
                    help="expert FFN width (default: calibrated so that T_a ≈ T_e at m=2, "
                         "in-process, then on the served pair unless --quick)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds over the m values (odd rounds backwards); medians over them")
    ap.add_argument("--ms", default="1,2,3,4")
    ap.add_argument("--stream-interval", type=int, default=8,
                    help="replica sends each request's tokens every N tokens (1 = per token; "
                         "with 1 core per process, per-token gRPC writes compete with compute)")
    ap.add_argument("--api", choices=("stream", "generate"), default="stream",
                    help="how the bench's client submits: all requests over one "
                         "GenerateStream call (one message per delivery burst; what the "
                         "gateway does) or one Generate call per request")
    ap.add_argument("--quick", action="store_true",
                    help="m=1,2 + baselines at batch 256, 2 repeats, 16 new tokens, in-process "
                         "calibration only, no planner check (under 4 minutes on a 2-vCPU "
                         "machine ~2x slower than the one the defaults were tuned on)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    machine = describe()
    print(one_line(machine), flush=True)
    if args.quick:
        args.ms, args.repeats, args.new_tokens = "1,2", 2, 16
    if args.batch is None:
        args.batch = 256 if args.quick else 512
    ms = [int(x) for x in args.ms.split(",")]
    work = Path(tempfile.mkdtemp(prefix="megascale-pingpong-"))
    SHAPE["hidden"], SHAPE["layers"] = args.hidden, args.layers
    if args.intermediate is None:
        phase("calibrating the expert FFN width in-process")
        inter, cal_a, cal_e = calibrate(args.hidden, args.batch // 2,
                                        args.prompt_len + args.new_tokens // 2, work)
        print(f"calibrated: intermediate {inter} (in-process T_a {cal_a:.2f} ms, T_e "
              f"{cal_e:.2f} ms per micro-batch of {args.batch // 2} tokens)", flush=True)
        SHAPE["intermediate"] = inter
        if not args.quick:
            g = torch.Generator().manual_seed(1)
            probe = torch.randint(3, SHAPE["vocab"], (args.batch, args.prompt_len),
                                  generator=g).tolist()
            phase("refining the width on served m=2 probes")
            inter, srv_a, srv_e, busy_a, busy_e = calibrate_served(inter, probe, work,
                                                                   args.stream_interval,
                                                                   args.api)
            print(f"served: intermediate {inter} (replica T_a {srv_a:.2f} ms, node T_e "
                  f"{srv_e:.2f} ms per call, busy {busy_a:.0%} / {busy_e:.0%} at m=2)",
                  flush=True)
            SHAPE["intermediate"] = inter
    else:
        SHAPE["intermediate"] = args.intermediate
    model = write_random_checkpoint(work / "model", "mixtral", tokenizer=False, **SHAPE)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, SHAPE["vocab"], (args.batch, args.prompt_len), generator=g).tolist()

    phase(f"disaggregated m={args.ms}")
    records = bench_disaggregated(model, prompts, args.new_tokens, ms, args.repeats, work,
                                  stream_interval=args.stream_interval, api=args.api)
    if not args.quick:  # the planner profiles four batch sizes: a minute or more
        phase("planner profile")
        records.extend(planner_predictions(model, args.batch,
                                           args.prompt_len + args.new_tokens // 2, ms))
    phase("monolithic")
    records.append(bench_monolithic(model, prompts, args.new_tokens, args.repeats))
    phase("transformers")
    records.append(bench_transformers(model, prompts, args.new_tokens, args.repeats))
    if args.png:
        phase("timeline")
        tl = work / "timeline"
        with start_mesh(model, prompts, 16, 2, work / "tl", tl,
                        stream_interval=args.stream_interval) as mesh:
            asyncio.run(run_batch(mesh.attention[0].grpc, prompts, 4, "warm", args.api))
            measure_once(mesh, prompts, 16, 2, "tl", args.api)
        plot_timeline(tl, args.png, args.batch)

    phase("done")
    by = {(r["impl"], r["m"]): r for r in records}
    mono, hf = by[("monolithic", 0)]["tokens_per_s"], by[("transformers", 0)]["tokens_per_s"]
    base = by.get(("disaggregated", 1))
    print(f"\nshape {SHAPE}\nbatch {args.batch}, {args.new_tokens} new tokens, median of "
          f"{args.repeats}")
    print(f"{'impl':<14}{'m':>3}{'tok/s':>10}{'vs m=1':>8}{'vs mono':>9}{'vs HF':>7}"
          f"{'attn busy':>11}{'exp busy':>10}{'T_a ms':>8}{'T_e ms':>8}{'RTT ms':>8}{'T_c ms':>8}"
          f"{'step ms':>8}{'loop ms':>8}")
    for r in records:
        if r["impl"] == "planner":
            continue
        vs1 = r["tokens_per_s"] / base["tokens_per_s"] if base and r["m"] else None
        row = (f"{r['impl']:<14}{r['m']:>3}{r['tokens_per_s']:>10.1f}"
               f"{(f'{vs1:.2f}x' if vs1 else '-'):>8}{r['tokens_per_s'] / mono:>8.2f}x"
               f"{r['tokens_per_s'] / hf:>6.2f}x")
        if r["attn_busy"] is not None:
            row += (f"{r['attn_busy']:>11.0%}{r['expert_busy']:>10.0%}{r['t_a_ms']:>8.2f}"
                    f"{r['t_e_ms']:>8.2f}{r['rtt_ms']:>8.2f}{r['t_c_ms']:>8.2f}{r['step_ms']:>8.1f}"
                    f"{r['loop_ms']:>8.1f}")
        print(row)
    for r in records:
        if r.get("vs_m1_all") and r["m"] != 1:
            v = r["vs_m1_all"]
            print(f"m={r['m']} / m=1 per repeat (same round): median {statistics.median(v):.2f}x "
                  f"[{min(v):.2f} .. {max(v):.2f}]")
    delivery = [f"m={r['m']} {r['delivery_ms']:.2f}" for r in records if "delivery_ms" in r]
    if delivery:
        print("token delivery delay (engine emit -> gRPC stream, mean ms): " + ", ".join(delivery))
    print("\nplanner (megascale plan's performance model, profiled with the real core layers):"
          + (" skipped with --quick" if args.quick else ""))
    for r in records:
        if r["impl"] == "planner":
            meas = by.get(("disaggregated", r["m"]))
            p = r["prediction"]
            err = f"{r['tokens_per_s'] / meas['tokens_per_s']:.2f}x of measured" if meas else ""
            print(f"  m={r['m']}: predicted {r['tokens_per_s']:.0f} tok/s ({err}); T_a "
                  f"{p['t_a_ms']:.2f} T_e {p['t_e_ms']:.2f} T_c {p['t_c_ms']:.3f} step "
                  f"{p['step_overhead_ms']:.2f} ms")
    prof = next((r["profile"] for r in records if r["impl"] == "planner"), {})
    for key, points in prof.items():
        if isinstance(points, list | tuple):
            print(f"  profile {key}: " + ", ".join(f"{b:.0f}: {1e3 * t:.2f}" for b, t in points)
                  + " ms")
    if args.json:
        for r in records:
            r["shape"], r["machine"] = dict(SHAPE), machine
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
