"""M2N transport benchmark: libm2n shm / tcp vs torch.distributed gloo vs a gRPC stream.

Pattern (the MoE dispatch/combine exchange): each of M sender processes sends one S-byte message
to each of N receiver processes, then waits for the N S-byte replies (each receiver echoes every
message back to its sender). Per iteration the sender records RTT; we report the one-way latency
``RTT / 2`` (p50, p99 over all senders' iterations) and the throughput ``gbps`` = payload bytes
moved in both directions / wall time of the slowest sender, in **GB/s (1e9 bytes/s)**.
``memcpy`` is a single-core copy of S bytes, the faster of ``numpy.copyto`` and ``torch.copy_``
(latency per copy, GB/s): the physical limit of a one-copy transport.

All transports run side by side in one invocation with the same schedule; figures depend on the
machine's load, so read the printed ratios, not the absolute numbers. ``--repeats R`` runs the
whole schedule R times (every transport in every repeat); the target ratios are computed per
repeat and reported as median [min .. max]; the table shows per-size medians over repeats.

    python bench/m2n.py --quick --json /tmp/m2n.json --plot /tmp/m2n.png
    python bench/m2n.py --pairs 1x1 --sizes-kb 256,1024 --transports shm,gloo --repeats 5

JSON (``--json PATH``): a list of records ``{transport, senders, receivers, size_bytes, iters,
p50_us, p99_us, gbps, repeats, spin_us}``, medians over repeats; ``PATH.detail.json`` beside it
holds every repeat's records and the per-repeat target ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
import uuid

import numpy as np

from libm2n.base import ReceiverConfig

TRANSPORTS = ("shm", "tcp", "gloo", "grpc")
KB, MB = 1 << 10, 1 << 20
WARMUP = 10


def _iters(size: int, quick: bool) -> int:
    budget = (48 if quick else 96) * MB  # payload bytes per sender per size, bounded below/above
    return int(max(30, min(300 if quick else 600, budget // size)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# -- libm2n -------------------------------------------------------------------------------------
def _m2n_sender(i, plan, sizes, iters, barrier, out):
    import libm2n

    rx = libm2n.open_receiver(plan["senders"][i],
                              libm2n.ReceiverConfig(slots_per_sender=4, slot_bytes=max(sizes),
                                                     spin_us=plan["spin_us"]))
    txs = [libm2n.connect(u, libm2n.SenderConfig(sender_id=i, connect_timeout_s=60))
           for u in plan["receivers"]]
    barrier.wait(timeout=120)
    res = {}
    for size in sizes:
        buf = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        lat = []
        barrier.wait(timeout=120)
        t_start = time.perf_counter()
        for it in range(WARMUP + iters[size]):
            if it == WARMUP:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            for tx in txs:
                tx.send(buf, tag=it)
            for _ in txs:
                rx.recv(timeout=60).release()
            if it >= WARMUP:
                lat.append((time.perf_counter() - t0) / 2)
        res[size] = (lat, time.perf_counter() - t_start)
    out.put(("ok", res))
    barrier.wait(timeout=120)
    for tx in txs:
        tx.close()
    rx.close()


def _m2n_receiver(j, plan, sizes, iters, barrier, out):
    import libm2n

    rx = libm2n.open_receiver(plan["receivers"][j],
                              libm2n.ReceiverConfig(slots_per_sender=4, slot_bytes=max(sizes),
                                                     spin_us=plan["spin_us"]))
    txs = {i: libm2n.connect(u, libm2n.SenderConfig(sender_id=1000 + j, connect_timeout_s=60))
           for i, u in enumerate(plan["senders"])}
    barrier.wait(timeout=120)
    m = len(plan["senders"])
    for size in sizes:
        barrier.wait(timeout=120)
        for _ in range(m * (WARMUP + iters[size])):
            msg = rx.recv(timeout=60)
            txs[msg.sender_id].send(msg.payload, tag=msg.header.tag).result(timeout=60)
            msg.release()
    barrier.wait(timeout=120)
    for tx in txs.values():
        tx.close()
    rx.close()


# -- gloo ---------------------------------------------------------------------------------------
def _gloo(rank, plan, sizes, iters, barrier, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    m, n = plan["m"], plan["n"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{plan['port']}",
                            rank=rank, world_size=m + n)
    res = {}
    for size in sizes:
        buf = torch.from_numpy(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
        rbufs = [torch.empty(size, dtype=torch.uint8) for _ in range(max(m, n))]
        dist.barrier()
        lat = []
        t_start = time.perf_counter()
        for it in range(WARMUP + iters[size]):
            if it == WARMUP:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            if rank < m:
                reqs = [dist.isend(buf, dst=m + j) for j in range(n)]
                reqs += [dist.irecv(rbufs[j], src=m + j) for j in range(n)]
                for r in reqs:
                    r.wait()
                if it >= WARMUP:
                    lat.append((time.perf_counter() - t0) / 2)
            else:
                for r in [dist.irecv(rbufs[i], src=i) for i in range(m)]:
                    r.wait()
                for r in [dist.isend(rbufs[i], dst=i) for i in range(m)]:
                    r.wait()
        res[size] = (lat, time.perf_counter() - t_start)
    if rank < m:
        out.put(("ok", res))
    dist.barrier()
    dist.destroy_process_group()


# -- gRPC ---------------------------------------------------------------------------------------
_GRPC_OPTS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _grpc_receiver(j, plan, sizes, iters, barrier, out):
    from concurrent import futures

    import grpc

    def exchange(request_iterator, context):
        yield from request_iterator  # echo every message back on the same stream

    handler = grpc.method_handlers_generic_handler(
        "m2nbench.Echo", {"Exchange": grpc.stream_stream_rpc_method_handler(exchange)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=len(plan["senders"]) + 2),
                         options=_GRPC_OPTS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(plan["receivers"][j])
    server.start()
    barrier.wait(timeout=120)
    for _ in sizes:
        barrier.wait(timeout=120)
    barrier.wait(timeout=300)
    server.stop(grace=1)


def _grpc_sender(i, plan, sizes, iters, barrier, out):
    import grpc

    streams = []
    for addr in plan["receivers"]:
        ch = grpc.insecure_channel(addr, options=_GRPC_OPTS)
        grpc.channel_ready_future(ch).result(timeout=60)
        q: queue.SimpleQueue = queue.SimpleQueue()
        call = ch.stream_stream("/m2nbench.Echo/Exchange")(iter(q.get, None))
        streams.append((ch, q, call))
    barrier.wait(timeout=120)
    res = {}
    for size in sizes:
        buf = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        barrier.wait(timeout=120)
        lat = []
        t_start = time.perf_counter()
        for it in range(WARMUP + iters[size]):
            if it == WARMUP:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            for _, q, _ in streams:
                q.put(buf)
            for _, _, call in streams:
                next(call)
            if it >= WARMUP:
                lat.append((time.perf_counter() - t0) / 2)
        res[size] = (lat, time.perf_counter() - t_start)
    out.put(("ok", res))
    for ch, q, _ in streams:
        q.put(None)
        ch.close()
    barrier.wait(timeout=300)


# -- driver -------------------------------------------------------------------------------------
def _run(fn, *args):
    try:
        fn(*args)
    except Exception:  # report, never hang the parent
        out = args[-1]
        out.put(("error", traceback.format_exc()))
        out.close()
        out.join_thread()  # flush the queue's feeder thread: os._exit would drop the report
        os._exit(1)


def run_group(transport: str, m: int, n: int, sizes: list[int], quick: bool,
              timeout_s: float = 240, spin_us: float | None = None) -> list[dict]:
    ctx = mp.get_context("spawn")
    iters = {s: _iters(s, quick) for s in sizes}
    tag = uuid.uuid4().hex[:8]
    if transport == "shm":
        plan = {"senders": [f"shm://bench-{tag}-s{i}" for i in range(m)],
                "receivers": [f"shm://bench-{tag}-r{j}" for j in range(n)]}
    elif transport == "tcp":
        plan = {"senders": [f"tcp://127.0.0.1:{_free_port()}" for _ in range(m)],
                "receivers": [f"tcp://127.0.0.1:{_free_port()}" for _ in range(n)]}
    elif transport == "grpc":
        plan = {"senders": [None] * m,
                "receivers": [f"127.0.0.1:{_free_port()}" for _ in range(n)]}
    else:
        plan = {"port": _free_port(), "m": m, "n": n}
    # libm2n receivers: ReceiverConfig.spin_us (None: the library's default)
    plan["spin_us"] = ReceiverConfig().spin_us if spin_us is None else spin_us
    out = ctx.Queue()
    procs = []
    if transport == "gloo":
        barrier = ctx.Barrier(1)  # unused: gloo synchronises itself
        for rank in range(m + n):
            procs.append(ctx.Process(target=_run, args=(_gloo, rank, plan, sizes, iters,
                                                        barrier, out)))
    else:
        barrier = ctx.Barrier(m + n)
        send_fn, recv_fn = ((_m2n_sender, _m2n_receiver) if transport in ("shm", "tcp")
                            else (_grpc_sender, _grpc_receiver))
        procs += [ctx.Process(target=_run, args=(recv_fn, j, plan, sizes, iters, barrier, out))
                  for j in range(n)]
        procs += [ctx.Process(target=_run, args=(send_fn, i, plan, sizes, iters, barrier, out))
                  for i in range(m)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + timeout_s
    try:
        while len(results) < m:
            try:
                status, payload = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{transport} {m}x{n}: timed out after {timeout_s}s") from None
            if status != "ok":
                raise RuntimeError(f"{transport} {m}x{n} failed:\n{payload}")
            results.append(payload)
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    records = []
    for size in sizes:
        lat = [x for r in results for x in r[size][0]]
        wall = max(r[size][1] for r in results)
        moved = 2 * m * n * iters[size] * size
        records.append({"transport": transport, "senders": m, "receivers": n,
                        "size_bytes": size, "iters": iters[size],
                        "p50_us": statistics.median(lat) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6,
                        "gbps": moved / wall / 1e9})
    return records


def memcpy_records(sizes: list[int], quick: bool) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    out = []
    for size in sizes:
        src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        dst = np.empty_like(src)
        tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
        best = None
        # glibc memcpy (numpy) and torch's vectorised copy; the faster one is the physical limit.
        copies = (("numpy.copyto", lambda d=dst, s=src: np.copyto(d, s)),
                  ("torch.copy_", lambda d=tdst, s=tsrc: d.copy_(s)))
        for method, copy in copies:
            lat = []
            for _ in range(WARMUP + _iters(size, quick)):
                t0 = time.perf_counter()
                copy()
                lat.append(time.perf_counter() - t0)
            lat = lat[WARMUP:]
            if best is None or statistics.median(lat) < statistics.median(best[1]):
                best = (method, lat)
        method, lat = best
        med = statistics.median(lat)
        out.append({"transport": "memcpy", "senders": 1, "receivers": 1, "size_bytes": size,
                    "iters": len(lat), "p50_us": med * 1e6, "p99_us": _pct(lat, 0.99) * 1e6,
                    "gbps": size / med / 1e9, "method": method})
    return out


def _find(records, transport, m, n, size):
    for r in records:
        if (r["transport"], r["senders"], r["receivers"], r["size_bytes"]) == (transport, m, n,
                                                                                size):
            return r
    return None


def target_ratios(records: list[dict], pairs: list[tuple[int, int]]) -> dict[str, float]:
    """The issue's target figures from one repeat's records (keys name pair and figure)."""
    out: dict[str, float] = {}
    mc = _find(records, "memcpy", 1, 1, MB)
    for m, n in pairs:
        s, g = _find(records, "shm", m, n, 256 * KB), _find(records, "gloo", m, n, 256 * KB)
        if s and g:
            out[f"{m}x{n} p50_lower_pct"] = 100 * (1 - s["p50_us"] / g["p50_us"])
            out[f"{m}x{n} p99_lower_pct"] = 100 * (1 - s["p99_us"] / g["p99_us"])
            out[f"{m}x{n} throughput_x"] = s["gbps"] / g["gbps"]
        s1 = _find(records, "shm", m, n, MB)
        if s1 and mc:
            out[f"{m}x{n} memcpy_pct_1MB"] = 100 * s1["gbps"] / mc["gbps"]
    return out


_TARGETS = {"p50_lower_pct": (">=", 75.0), "p99_lower_pct": (">=", 90.0),
            "throughput_x": (">=", 4.5), "memcpy_pct_1MB": (">=", 50.0)}


def summarize(per_repeat: list[dict[str, float]]) -> tuple[list[str], dict[str, dict]]:
    """Median and spread (min..max) over repeats of every target figure; each repeat's ratios
    were measured side by side in that repeat."""
    lines, out = [], {}
    for key in per_repeat[0] if per_repeat else []:
        vals = [r[key] for r in per_repeat if key in r]
        med = statistics.median(vals)
        _, target = _TARGETS[key.split(" ", 1)[1]]
        out[key] = {"median": med, "min": min(vals), "max": max(vals), "target": target,
                    "met": med >= target, "values": vals}
        lines.append(f"{key:24s} median {med:7.2f}  [min {min(vals):7.2f} .. max "
                     f"{max(vals):7.2f}]  target >= {target:g}  "
                     f"{'MET' if med >= target else 'not met'}")
    return lines, out


def median_records(records: list[dict]) -> list[dict]:
    """One record per (transport, M, N, size): medians over repeats."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["transport"], r["senders"], r["receivers"], r["size_bytes"]),
                          []).append(r)
    out = []
    for rs in groups.values():
        rec = dict(rs[0])
        for k in ("p50_us", "p99_us", "gbps"):
            rec[k] = statistics.median(r[k] for r in rs)
        rec["repeats"] = len(rs)
        rec.pop("repeat", None)
        out.append(rec)
    return out


def plot(records: list[dict], pairs: list[tuple[int, int]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(pairs), figsize=(5 * len(pairs), 8), squeeze=False)
    for col, (m, n) in enumerate(pairs):
        for t in (*TRANSPORTS, "memcpy"):
            rs = sorted((r for r in records if r["transport"] == t and
                         (t == "memcpy" or (r["senders"], r["receivers"]) == (m, n))),
                        key=lambda r: r["size_bytes"])
            if not rs:
                continue
            xs = [r["size_bytes"] / KB for r in rs]
            axes[0][col].plot(xs, [r["p50_us"] for r in rs], marker="o", label=t)
            axes[1][col].plot(xs, [r["gbps"] for r in rs], marker="o", label=t)
        axes[0][col].set_title(f"{m} senders x {n} receivers")
        axes[0][col].set_ylabel("one-way p50 latency (us)")
        axes[1][col].set_ylabel("throughput (GB/s)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("message size (KB)")
            ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1x1 and 2x2 at 16 KB, 256 KB, 1 MB")
    ap.add_argument("--json", default="bench/m2n.json", help="where to write the results")
    ap.add_argument("--plot", default="bench/m2n.png", help="where to write the PNG plot")
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    ap.add_argument("--pairs", help="MxN list, e.g. 1x1,2x2 (default: by --quick)")
    ap.add_argument("--sizes-kb", help="message sizes in KB, e.g. 256,1024 (default: by --quick)")
    ap.add_argument("--spin-us", type=float, default=ReceiverConfig().spin_us,
                    help="libm2n ReceiverConfig.spin_us for shm/tcp (default: the library's, "
                         f"{ReceiverConfig().spin_us:g} us; 0 = sleep at once)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the whole schedule this many times; report medians and spread")
    args = ap.parse_args(argv)
    transports = [t for t in args.transports.split(",") if t]
    for t in transports:
        if t not in TRANSPORTS:
            ap.error(f"unknown transport {t!r} (choose from {', '.join(TRANSPORTS)})")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.quick:
        pairs, sizes = [(1, 1), (2, 2)], [16 * KB, 256 * KB, MB]
    else:
        pairs = [(1, 1), (2, 2), (4, 4)]
        sizes = [2 * KB, 16 * KB, 64 * KB, 256 * KB, MB, 4 * MB, 8 * MB]
    try:
        if args.pairs:
            pairs = [tuple(int(x) for x in p.lower().split("x")) for p in args.pairs.split(",")]
            assert all(len(p) == 2 and min(p) >= 1 for p in pairs)
        if args.sizes_kb:
            sizes = [int(x) * KB for x in args.sizes_kb.split(",")]
            assert all(x > 0 for x in sizes)
    except (ValueError, AssertionError):
        ap.error("--pairs is like 1x1,2x2 and --sizes-kb like 256,1024 (positive integers)")
    records: list[dict] = []
    per_repeat: list[dict[str, float]] = []
    t0 = time.monotonic()
    for rep in range(args.repeats):
        rec_rep = memcpy_records(sizes, args.quick)
        for m, n in pairs:
            for t in transports:  # side by side: every transport in every repeat
                try:
                    rs = run_group(t, m, n, sizes, args.quick, spin_us=args.spin_us)
                except RuntimeError as exc:
                    print(f"!! {exc}", file=sys.stderr)
                    continue
                rec_rep += rs
                for r in rs:
                    print(f"[{rep}] {t:5s} {m}x{n} {r['size_bytes'] // KB:6d} KB  "
                          f"p50 {r['p50_us']:9.1f} us  p99 {r['p99_us']:9.1f} us  "
                          f"{r['gbps']:7.3f} GB/s", flush=True)
        for r in rec_rep:
            r["repeat"] = rep
        records += rec_rep
        per_repeat.append(target_ratios(rec_rep, pairs))
    med = median_records(records)
    print(f"medians over {args.repeats} repeat(s):")
    for r in sorted(med, key=lambda r: (r["senders"], r["size_bytes"], r["transport"])):
        print(f"{r['transport']:6s} {r['senders']}x{r['receivers']} "
              f"{r['size_bytes'] // KB:6d} KB  p50 {r['p50_us']:9.1f} us  "
              f"p99 {r['p99_us']:9.1f} us  {r['gbps']:7.3f} GB/s")
    lines, targets = summarize(per_repeat)
    print("targets (shm vs gloo @256KB, shm vs memcpy @1MB), per-repeat ratios:")
    print("\n".join(lines))
    print(f"(total {time.monotonic() - t0:.0f}s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    for r in med:  # the JSON is a list of records (medians over repeats), as the issue asks
        r.update(repeats=args.repeats, spin_us=args.spin_us)
    with open(args.json, "w") as f:
        json.dump(med, f, indent=1)
    detail = os.path.splitext(args.json)[0] + ".detail.json"
    with open(detail, "w") as f:  # every repeat's records and the target ratios
        json.dump({"targets": targets, "records": records}, f, indent=1)
    plot(med, pairs, args.plot)
    print(f"wrote {args.json}, {detail} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
