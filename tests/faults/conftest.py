"""One real mesh shared by the fault-matrix tests, and the steady load they run against it.

The mesh is what ``megascale up --elastic-experts`` builds, supervised the same way
(:class:`services.launch.up.Mesh`: a child that dies is restarted on its old ports), with
short bounds so that faults are seen quickly: a real redis-server, the scheduler (lease 2 s),
two elastic expert nodes (``--experts auto``, one copy of each expert), two attention
replicas that learn the expert nodes from the scheduler (expert timeout 2 s) and two gateways.

:class:`Load` sends greedy completions of fixed prompts through both gateways from two client
threads and checks each against the output the undisturbed mesh gave (the reference is taken
once, before any fault). A client retries on the other gateway only when its connection to a
gateway failed (what a load balancer in front of several gateways does); any other failure,
or an output that differs, is a lost request.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from services.core.demo import write_random_checkpoint
from services.launch.procs import RoleProcess
from services.launch.up import Mesh

MODEL_SHAPE = dict(layers=2, hidden=64, intermediate=96, experts=8, top_k=2, heads=4,
                   kv_heads=2, vocab=512, max_position=256, seed=25)
PROMPTS = [f"fault matrix prompt {i}" for i in range(6)]
MAX_TOKENS = 12
_POOLS: list[ThreadPoolExecutor] = []
NODE_TTL = "2"          # scheduler lease: a dead node is planned out within ~2.5 s
EXPERT_TIMEOUT = "2"    # a silent expert node is marked down after this
EXPERT_WAIT = "25"      # requests pause this long for lost experts


@dataclass
class Outcome:
    prompt: str
    start: float
    end: float
    ok: bool
    detail: str = ""
    retries: int = 0  # connection failures to a gateway, retried on the other


@dataclass
class FaultMesh:
    mesh: Mesh
    model_dir: Path
    workdir: Path
    gateways: list[str]                  # http://127.0.0.1:PORT/v1
    model: str
    reference: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # over mesh.children

    def remove(self, name: str) -> RoleProcess:
        """Take a child out of supervision (it is not restarted when it exits)."""
        with self.lock:
            child = self.child(name)
            self.mesh.children.remove(child)
        return child

    def add_expert(self, i: int) -> RoleProcess:
        with self.lock:
            return start_expert(self.mesh, self.model_dir, self.child("scheduler").grpc, i)

    def child(self, name: str) -> RoleProcess:
        return next(c for c in self.mesh.children if c.name == name)

    def pid(self, name: str) -> int:
        return self.child(name).proc.pid

    def wait_restarted(self, name: str, old_pid: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pid(name) == old_pid or not self.child(name).alive():
            assert time.monotonic() < deadline, f"{name} was not restarted"
            time.sleep(0.1)

    def scheduler_log(self) -> str:
        return (self.workdir / "scheduler.log").read_text(errors="replace")

    def placement_epoch(self) -> int:
        epochs = re.findall(r"placement epoch (\d+):", self.scheduler_log())
        return int(epochs[-1]) if epochs else 0

    def complete(self, client: httpx.Client, prompt: str, gateway: int = 0,
                 timeout_s: float = 60) -> str:
        r = client.post(f"{self.gateways[gateway]}/completions", timeout=timeout_s, json={
            "model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True})
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["text"]


class Load:
    """Steady load through both gateways (module docstring); ``stop()`` returns every
    request's :class:`Outcome` once all in flight have ended."""

    def __init__(self, fm: FaultMesh, threads: int = 2) -> None:
        self.fm = fm
        self.outcomes: list[Outcome] = []
        self.started: dict[int, float] = {}  # client thread -> start of its request in flight
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(120)
            assert not t.is_alive(), "a load thread hangs"
        return self.outcomes

    def _run(self, k: int) -> None:
        with httpx.Client() as client:
            i = k
            while not self._stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                gw = i % len(self.fm.gateways)
                i += len(self._threads)
                start, retries, out = time.monotonic(), 0, None
                self.started[k] = start
                for attempt in range(4):
                    try:
                        text = self.fm.complete(client, prompt, (gw + attempt) % 2)
                    except httpx.TransportError as exc:  # the gateway itself is gone
                        retries += 1
                        out = Outcome(prompt, start, time.monotonic(), False,
                                      f"{type(exc).__name__}: {exc}", retries)
                        time.sleep(0.05)
                        continue
                    except RuntimeError as exc:
                        out = Outcome(prompt, start, time.monotonic(), False, str(exc), retries)
                        break
                    want = self.fm.reference[prompt]
                    out = Outcome(prompt, start, time.monotonic(), text == want,
                                  "" if text == want else f"got {text!r}, want {want!r}",
                                  retries)
                    break
                with self._lock:
                    self.outcomes.append(out)
                    self.started.pop(k, None)

    def oldest_in_flight(self) -> float | None:
        """Start of the oldest request still in flight (None: none is)."""
        with self._lock:
            return min(self.started.values(), default=None)

    def completed_since(self, t: float) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.start >= t and o.ok)


def _start_mesh(root: Path) -> FaultMesh:
    model_dir = write_random_checkpoint(root / "mixtral-faults", "mixtral", **MODEL_SHAPE)
    workdir = root / "work"
    workdir.mkdir()
    mesh = Mesh(workdir, quiet=True)
    try:
        redis_url = mesh.start_redis()
        sched = mesh.start_role("scheduler", [
            "--redis-url", redis_url, "--model", str(model_dir), "--node-ttl", NODE_TTL,
            "--expert-replicas", "1", "--max-batch-tokens", "256"], "scheduler")
        # Started side by side (each waits for its ready file): the replicas wait for the
        # scheduler's first placement, which needs the expert nodes. The pool's threads live
        # as long as the mesh: children die with the thread that forked them (PDEATHSIG).
        pool = ThreadPoolExecutor(4)
        _POOLS.append(pool)
        experts = [pool.submit(start_expert, mesh, model_dir, sched.grpc, i) for i in range(2)]
        replicas = [pool.submit(mesh.start_role, "attention", [
            "--model", str(model_dir), "--m2n-url", "tcp://127.0.0.1:0", "--m2n-sender-id",
            str(i), "--scheduler", sched.grpc, "--expert-timeout", EXPERT_TIMEOUT,
            "--expert-wait", EXPERT_WAIT, "--max-batch-tokens", "256", "--max-model-len", "128",
            "--num-blocks", "64"], f"attention-{i}") for i in range(2)]
        addresses = ",".join(r.result().grpc for r in replicas)
        gateways = [pool.submit(mesh.start_role, "gateway", [
            "--model", str(model_dir), "--port", "0", "--scheduler", sched.grpc,
            "--attention", addresses], f"gateway-{i}") for i in range(2)]
        gateways = [g.result() for g in gateways]
        for e in experts:
            e.result()
    except BaseException:
        mesh.stop()
        raise
    return FaultMesh(mesh, model_dir, workdir, [f"{g.info['http']}/v1" for g in gateways],
                     model_dir.name)


def start_expert(mesh: Mesh, model_dir: Path, scheduler: str, i: int) -> RoleProcess:
    return mesh.start_role("expert", [
        "--model", str(model_dir), "--experts", "auto", "--m2n-url", "tcp://127.0.0.1:0",
        "--m2n-sender-id", str(1000 + i), "--scheduler", scheduler, "--max-batch-tokens",
        "256"], f"expert-{i}")


@pytest.fixture(scope="package")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory, hf_greedy):
    t0 = time.monotonic()
    fm = _start_mesh(tmp_path_factory.mktemp("faults"))
    supervisor = threading.Thread(target=_supervise, args=(fm,), daemon=True)
    supervisor.start()
    try:
        with httpx.Client() as client:
            for p in PROMPTS:  # the undisturbed outputs (retried while the mesh settles)
                deadline = time.monotonic() + 60
                while True:
                    try:
                        fm.reference[p] = fm.complete(client, p)
                        break
                    except (RuntimeError, httpx.TransportError):
                        assert time.monotonic() < deadline, "the fault mesh never served"
                        time.sleep(0.5)
            tok = AutoTokenizer.from_pretrained(fm.model_dir)
            for p in PROMPTS[:2]:  # the elastic mesh computes what transformers does
                want = hf_greedy(fm.model_dir, [tok.encode(p)], MAX_TOKENS)[0]
                assert fm.reference[p] == tok.decode(want, skip_special_tokens=True)
            for gw in (0, 1):
                for p in PROMPTS:  # same output through either gateway and either replica
                    assert fm.complete(client, p, gw) == fm.reference[p]
        print(f"\nfault mesh up and checked in {time.monotonic() - t0:.1f} s")
        yield fm
    finally:
        fm._stop.set()
        supervisor.join(5)
        fm.mesh.stop()
        while _POOLS:
            _POOLS.pop().shutdown()


def _supervise(fm: FaultMesh) -> None:
    while not fm._stop.is_set():
        with fm.lock:
            fm.mesh.supervise()
        fm._stop.wait(0.2)
