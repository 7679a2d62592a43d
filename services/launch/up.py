"""``megascale up``: the whole mesh on loopback, as separate processes, stopped cleanly.

Starts, in order: a ``redis-server`` child (unless ``--redis-url`` is given), the scheduler, the
expert nodes (experts split evenly, optionally with replicas of some ids), the attention
replicas, and the gateway; waits until each is serving (ready files), prints the endpoint and an
example ``curl``, and streams every child's log prefixed with its name. A child that dies is
restarted (with backoff) on the ports it had, and rejoins through the scheduler; the others
keep serving. SIGINT / SIGTERM stop the children in reverse order (SIGTERM, then SIGKILL after
a grace period). Children also get ``PR_SET_PDEATHSIG`` so they die with the launcher even if
it is SIGKILLed: no orphans.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from services.common import auth
from services.common.flags import add_flag, secret_from
from services.core.runtime import COMPUTE_DTYPES, pick_device
from services.errors import UserError
from services.launch.layout import DEFAULT_EXPERT_NODES, LAYOUTS, choose_layout
from services.launch.procs import RoleProcess, partition_experts, spawn_role
from services.launch.tls import make_role_certificates

_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_S = 1.0  # a child that dies is restarted after this, doubling per restart
RESTART_BACKOFF_MAX_S = 30.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="start the whole mesh locally (redis, scheduler, "
                                         "experts, attention, gateway)")
    add_flag(p, "--model", required=True, help="checkpoint directory (megascale demo-model)")
    add_flag(p, "--attention", type=int, default=1, help="attention replicas")
    add_flag(p, "--layout", default="auto", choices=LAYOUTS,
             help="colocated (each replica computes its experts in-process) or disaggregated "
                  "(expert nodes); auto picks by whether experts would get hardware of their "
                  "own, and prints why")
    add_flag(p, "--experts", type=int, default=None,
             help=f"expert nodes (implies --layout disaggregated under auto; default "
                  f"{DEFAULT_EXPERT_NODES})")
    add_flag(p, "--replicate", default="", help="expert ids to host twice, e.g. 0,3")
    add_flag(p, "--expert-replicas", type=int, default=1,
             help="copies of every expert on distinct expert nodes (the scheduler's flag); "
                  "above 1 the expert nodes are elastic, as with --elastic-experts")
    add_flag(p, "--elastic-experts", action="store_true",
             help="start the expert nodes with --experts auto: the scheduler assigns their "
                  "experts and moves a lost node's experts to the others")
    add_flag(p, "--micro-batches", type=int, default=None,
             help="m, micro-batches per step (disaggregated; default 2)")
    add_flag(p, "--threads", type=int, default=None,
             help="torch threads per compute process (default: on CPU the cores split evenly "
                  "over them)")
    add_flag(p, "--port", type=int, default=8000, help="gateway HTTP port (0 = pick)")
    add_flag(p, "--host", default="127.0.0.1", help="gateway bind address")
    add_flag(p, "--redis-url", default=None, help="use this Redis instead of starting one")
    add_flag(p, "--transport", default="tcp", choices=["tcp", "shm"],
             help="libm2n transport between attention and experts")
    add_flag(p, "--workdir", default=None, help="logs and ready files (default: a temp dir)")
    add_flag(p, "--api-key", default=None,
             help="require this bearer key at the gateway; better given as MEGASCALE_API_KEY "
                  "or --api-key-file (argv is visible in ps)")
    add_flag(p, "--api-key-file", default=None, help="file holding the gateway's API key")
    add_flag(p, "--allowed-origins", default="",
             help="the gateway's CORS origins (comma list, * = any; empty = no CORS)")
    add_flag(p, "--quiet", action="store_true", help="do not stream the children's logs")
    add_flag(p, "--tls", action="store_true",
             help="mTLS between the roles with a throwaway CA in WORKDIR/tls (the cluster "
                  "token is used either way)")
    add_flag(p, "--device", default="auto",
             help="cpu | cuda[:N] | auto (cuda when a GPU is visible): every compute role")
    add_flag(p, "--attention-devices", default=None,
             help="comma list of devices for the attention replicas, in turn (e.g. "
                  "cuda:0,cuda:1); default --device")
    add_flag(p, "--expert-devices", default=None,
             help="comma list of devices for the expert nodes, in turn; default --device")
    add_flag(p, "--dtype", default="auto", choices=["auto", *COMPUTE_DTYPES],
             help="compute dtype of attention and experts (auto: bfloat16 on CUDA, float32 on "
                  "CPU); activations travel in it")
    add_flag(p, "--served-model-name", default=None,
             help="model id clients send (default: the model directory's name)")
    add_flag(p, "--max-model-len", type=int, default=None,
             help="prompt + output tokens per request (default: the replicas' 4096, capped "
                  "by the checkpoint)")
    add_flag(p, "--max-batch-tokens", type=int, default=512,
             help="tokens per engine step; the expert nodes' receive slots are sized for it")
    add_flag(p, "--gpu-memory-utilization", type=float, default=0.9,
             help="on CUDA, the fraction of its card each attention replica may use; its KV "
                  "cache gets what the weights leave")
    add_flag(p, "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
             help="the replicas share the KV blocks of prompt prefixes seen before")
    p.set_defaults(func=run)


_TLS_ROLES = ["scheduler", "attention", "expert", "gateway"]


class Mesh:
    """The children of one ``megascale up`` and how to stop them."""

    def __init__(self, workdir: Path, quiet: bool, tls: bool = False) -> None:
        self.workdir = workdir
        self.quiet = quiet
        # One secret per launch, in a file only this user can read: every internal gRPC call
        # and libm2n link of the mesh must present it (services/common/auth.py).
        token = secrets.token_hex(32)
        token_file = _secret_file(workdir / "cluster.token", token)
        self.env = {"MEGASCALE_CLUSTER_TOKEN_FILE": str(token_file)}
        # The gateway faces clients: it gets only its role's credential, not the token.
        gateway_file = auth.write_role_credential(workdir / "gateway.credential",
                                                  token.encode(), "gateway")
        self.gateway_env = {"MEGASCALE_CLUSTER_TOKEN_FILE": str(gateway_file)}
        # --tls: a throwaway CA and one certificate per role; internal gRPC is then mTLS.
        self.tls_env = (make_role_certificates(workdir / "tls", _TLS_ROLES) if tls else {})
        self.children: list[RoleProcess] = []
        self._specs: dict[str, tuple[str, list[str]]] = {}  # name -> (role, args) as started
        self._restarts: dict[str, list[float]] = {}  # name -> times it was restarted
        self._redis_port = 0
        self._stop_tail = threading.Event()
        self._tails: list[threading.Thread] = []

    def _env(self, role: str) -> dict[str, str]:
        return {**(self.gateway_env if role == "gateway" else self.env),
                **self.tls_env.get(role, {})}

    def start_role(self, role: str, args: list[str], name: str) -> RoleProcess:
        log = self.workdir / f"{name}.log"
        proc = spawn_role(role, args, name, self.workdir,
                          env=self._env(role), log=log,
                          preexec_fn=_die_with_parent)
        self.children.append(proc)
        self._specs[name] = (role, list(args))
        self._tail(log, name)
        return proc

    # ------------------------------------------------------------------ supervision
    def supervise(self) -> None:
        """Restart every child that died, keeping the others running. A restarted role binds
        the ports it had (so peers that know its address reach it again) and rejoins through
        the scheduler; restarts of one child back off (RESTART_BACKOFF_S, doubling)."""
        now = time.monotonic()
        for i, child in enumerate(self.children):
            if child.alive():
                continue
            recent = [t for t in self._restarts.get(child.name, []) if now - t < 300]
            wait = min(RESTART_BACKOFF_S * 2 ** len(recent), RESTART_BACKOFF_MAX_S)
            if recent and now - recent[-1] < wait:
                continue
            print(f"megascale up: {child.name} exited (code {child.proc.returncode}); "
                  f"restarting it (restart {len(recent) + 1} in 5 min)", file=sys.stderr,
                  flush=True)
            self._restarts[child.name] = [*recent, now]
            try:
                self.children[i] = (self._respawn_redis() if child.name == "redis"
                                    else self._respawn(child))
            except (RuntimeError, UserError) as exc:
                print(f"megascale up: restarting {child.name} failed: {exc}", file=sys.stderr,
                      flush=True)

    def _respawn(self, child: RoleProcess) -> RoleProcess:
        role, args = self._specs[child.name]
        return spawn_role(role, _pinned(args, child.info), child.name, self.workdir,
                          env=self._env(role), log=self.workdir / f"{child.name}.log",
                          preexec_fn=_die_with_parent)

    def _respawn_redis(self) -> RoleProcess:
        self.start_redis(self._redis_port)  # appends the new process: hand it back instead
        return self.children.pop()

    def start_redis(self, port: int = 0) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise UserError("redis-server is not installed: install it (apt-get install "
                            "redis-server) or pass --redis-url")
        import socket

        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self._redis_port = port
        log = self.workdir / "redis.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--dir", str(self.workdir)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        self.children.append(RoleProcess("redis", proc, {"pid": proc.pid}, log))
        if not any(t.name == "tail-redis" for t in self._tails):
            self._tail(log, "redis")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return f"redis://127.0.0.1:{port}/0"
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise UserError(f"redis-server did not start (see {log})")

    def _tail(self, path: Path, name: str) -> None:
        if self.quiet:
            return
        t = threading.Thread(target=_follow, args=(path, name, self._stop_tail), daemon=True,
                             name=f"tail-{name}")
        t.start()
        self._tails.append(t)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=10)
        self._stop_tail.set()
        for t in self._tails:
            t.join(timeout=1)


def _secret_file(path: Path, secret: str) -> Path:
    """Write ``secret`` to ``path``, readable by this user only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.encode())
    finally:
        os.close(fd)
    return path


def _check_port_free(host: str, port: int) -> None:
    """A one-line UserError now, before anything starts, when ``host:port`` is taken."""
    import socket

    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                            "pick another port or stop what holds it") from None


def metrics_addresses(children: list[RoleProcess], host: str) -> str:
    """``name=http://HOST:PORT/metrics`` for every child that serves metrics, one line."""
    out = []
    for c in children:
        port = c.info.get("metrics_port")
        if port:
            where = host if c.name == "gateway" else "127.0.0.1"
            out.append(f"{c.name}=http://{where}:{port}/metrics")
    return " ".join(out)


def _pinned(args: list[str], info: dict) -> list[str]:
    """``args`` with the ports a role bound last time (its ready file) instead of 0, so that
    a restarted role keeps its addresses."""
    out = list(args)

    def pin(flag: str, value: str | None) -> None:
        if value is None:
            return
        if flag in out:
            i = out.index(flag) + 1
            if out[i] in ("0", "tcp://127.0.0.1:0"):
                out[i] = value
        else:
            out.extend([flag, value])

    pin("--grpc-port", info["grpc"].rsplit(":", 1)[1] if info.get("grpc") else None)
    if info.get("metrics_port") is not None:
        pin("--metrics-port", str(info["metrics_port"]))
    if "http" in info:
        pin("--port", info["http"].rsplit(":", 1)[1])
    if str(info.get("m2n_url", "")).startswith("tcp://"):
        pin("--m2n-url", info["m2n_url"])
    return out


def _follow(path: Path, name: str, stop: threading.Event) -> None:
    """Print new lines of ``path`` prefixed with ``[name]`` until ``stop`` is set."""
    with open(path, errors="replace") as f:
        while True:
            line = f.readline()
            if line:
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()
            elif stop.is_set():
                return
            else:
                time.sleep(0.1)


def _devices(listed: str | None, default: str) -> list[str]:
    """``--attention-devices`` / ``--expert-devices`` (or ``--device`` for all), resolved and
    checked here so that a bad name fails before anything starts."""
    names = [d.strip() for d in (listed or default).split(",") if d.strip()]
    if not names:
        raise UserError("a device list must name at least one device")
    return [pick_device(d) for d in names]


def run(args: argparse.Namespace) -> int:
    from services.core.config import ModelConfig

    model = Path(args.model)
    cfg = ModelConfig.from_pretrained(model)  # fail fast with a clear message
    if args.attention < 1:
        raise UserError(f"--attention must be >= 1, got {args.attention}")
    replicate = [int(x) for x in args.replicate.split(",") if x.strip()]
    api_key = secret_from(args.api_key, args.api_key_file, "--api-key")
    _check_port_free(args.host, args.port)
    attention_devices = _devices(args.attention_devices, args.device)
    expert_devices = _devices(args.expert_devices, args.device)
    node_flag = ("--expert-replicas" if args.expert_replicas > 1 else "--elastic-experts"
                 if args.elastic_experts else "--replicate" if replicate else None)
    layout = choose_layout(args.layout, args.attention, args.experts, args.micro_batches,
                           attention_devices, expert_devices, cfg.num_experts, args.threads,
                           node_flag=node_flag, min_nodes=args.expert_replicas)
    if not 1 <= args.expert_replicas <= max(layout.experts, 1):
        raise UserError(f"--expert-replicas must be in 1..--experts ({layout.experts}), got "
                        f"{args.expert_replicas}")
    elastic = args.elastic_experts or args.expert_replicas > 1
    dtype = args.dtype
    if dtype == "auto":
        on_gpu = any(d.startswith("cuda") for d in (*attention_devices, *expert_devices))
        dtype = "bfloat16" if on_gpu else "float32"
    compute = ["--dtype", dtype, "--max-batch-tokens", str(args.max_batch_tokens)]
    context = ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    named = ["--served-model-name", args.served_model_name] if args.served_model_name else []
    caching = ["--enable-prefix-caching" if args.enable_prefix_caching
               else "--no-enable-prefix-caching"]
    print(layout.describe(), flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="megascale-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = Mesh(workdir, args.quiet, tls=args.tls)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        redis_url = args.redis_url or mesh.start_redis()
        sched = mesh.start_role("scheduler", ["--redis-url", redis_url, "--model", str(model),
                                              "--micro-batches", str(layout.micro_batches),
                                              "--max-batch-tokens", str(args.max_batch_tokens),
                                              "--expert-replicas", str(args.expert_replicas),
                                              "--metrics-port", "0"], "scheduler")
        tag = f"{os.getpid()}"  # unique shm names per launcher
        experts = []
        shards = partition_experts(cfg.num_experts, layout.experts, replicate) \
            if layout.experts else []
        for i, ids in enumerate(shards):
            url = f"shm://m2n-up{tag}-e{i}" if args.transport == "shm" else "tcp://127.0.0.1:0"
            hosted = "auto" if elastic else ",".join(map(str, ids))
            experts.append(mesh.start_role("expert", [
                "--model", str(model), "--experts", hosted, "--m2n-url", url,
                "--m2n-sender-id", str(1000 + i), "--scheduler", sched.grpc,
                "--metrics-port", "0", "--device", expert_devices[i % len(expert_devices)],
                "--threads", str(layout.expert_threads), *compute], f"expert-{i}"))
        replicas = []
        for i in range(args.attention):
            url = f"shm://m2n-up{tag}-a{i}" if args.transport == "shm" else "tcp://127.0.0.1:0"
            # elastic: the nodes and what they host come from the scheduler's placement
            where = [] if elastic else \
                ["--expert-nodes", ",".join(e.grpc for e in experts)] if experts \
                else ["--local-experts"]
            replicas.append(mesh.start_role("attention", [
                "--model", str(model), *where,
                "--m2n-url", url, "--m2n-sender-id", str(i), "--scheduler", sched.grpc,
                "--micro-batches", str(layout.micro_batches), "--metrics-port", "0",
                "--threads", str(layout.attention_threads),
                "--device", attention_devices[i % len(attention_devices)],
                "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                *compute, *context, *named, *caching], f"attention-{i}"))
        gw_args = ["--model", str(model), "--port", str(args.port), "--host", args.host,
                   "--metrics-port", "0",
                   "--scheduler", sched.grpc, "--attention", ",".join(r.grpc for r in replicas)]
        gw_args += named + context
        if args.allowed_origins:
            gw_args += ["--allowed-origins", args.allowed_origins]
        if api_key:  # through a file only the launch can read, never argv
            gw_args += ["--api-key-file", str(_secret_file(workdir / "api.key", api_key))]
        gateway = mesh.start_role("gateway", gw_args, "gateway")
        http = gateway.info["http"]
        name = gateway.info.get("model", model.name)
        auth = f"    -H 'Authorization: Bearer {api_key}' \\\n" if api_key else ""
        print(f"\nmegascale is up: {http}/v1  (model {name!r}; logs in {workdir})\n"
              f"  curl {http}/v1/completions -H 'Content-Type: application/json' \\\n"
              f"{auth}"
              f"    -d '{{\"model\": \"{name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
              f"Prometheus metrics: {metrics_addresses(mesh.children, args.host)}\n"
              "Ctrl-C stops everything.\n", flush=True)
        while not stopping.is_set():
            mesh.supervise()
            stopping.wait(0.5)
        return 0
    except RuntimeError as exc:  # a role failed to start: its log tail is in the message
        raise UserError(str(exc)) from None
    finally:
        mesh.stop()
