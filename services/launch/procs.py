"""Start role processes and wait until they serve: used by ``megascale up``, tests and benches.

Each role runs as ``python -m services.cli serve ROLE ... --ready-file F``; it writes ``F``
(JSON: bound addresses, pid) once every server is up, so ports chosen with 0 are known to the
parent. :class:`RoleProcess.stop` sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from services.common.readyfile import wait_ready_file
from services.expert.config import partition_experts

__all__ = ["LocalMesh", "RoleProcess", "partition_experts", "spawn_role"]

_MESH_IDS = itertools.count()


@dataclass
class RoleProcess:
    """A started role: its process, what its ready file said, and where its log goes."""

    name: str
    proc: subprocess.Popen
    info: dict[str, Any]
    log_path: Path | None = None

    @property
    def grpc(self) -> str:
        return self.info["grpc"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout``, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (failure injection)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def spawn_role(role: str, args: Sequence[str], name: str, workdir: Path,
               env: dict[str, str] | None = None, log: IO[bytes] | Path | None = None,
               timeout_s: float = 120.0, cpus: str | None = None,
               preexec_fn: Callable[[], None] | None = None) -> RoleProcess:
    """Start ``megascale serve ROLE ARGS`` and wait for its ready file.

    ``cpus`` (e.g. ``"1"``) pins the process and every thread it starts to those cores.
    """
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "services.cli", "serve", role, *args, "--ready-file",
           str(ready), "--node-id", name]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("MEGASCALE_TORCH_THREADS", "1")
    log_path = None
    if isinstance(log, Path):
        log_path = log
        out: Any = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
    else:
        out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else out,
                            env=full_env, start_new_session=True, preexec_fn=preexec_fn)
    if isinstance(log, Path):
        out.close()
    try:
        info = wait_ready_file(ready, timeout_s, alive=lambda: proc.poll() is None)
    except (RuntimeError, TimeoutError) as exc:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        tail = ""
        if log_path is not None and log_path.exists():
            tail = "\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{name}: {exc} (exit code {proc.returncode}){tail}") from None
    return RoleProcess(name, proc, info, log_path)


@dataclass
class LocalMesh:
    """Expert nodes + attention replicas started on loopback (no scheduler, no gateway)."""

    experts: list[RoleProcess] = field(default_factory=list)
    attention: list[RoleProcess] = field(default_factory=list)
    workdir: Path | None = None

    @classmethod
    def start(cls, model_dir: str | Path, expert_ids: Sequence[Sequence[int]],
              attention_replicas: int = 1, micro_batches: int = 2,
              attention_args: Sequence[str] = (), expert_args: Sequence[str] = (),
              workdir: Path | None = None, transport: str = "tcp",
              env: dict[str, str] | None = None, expert_cpus: str | None = None,
              attention_cpus: str | None = None) -> LocalMesh:
        """Start one expert node per entry of ``expert_ids`` and N attention replicas; no
        ``expert_ids`` at all: colocated replicas (``--local-experts``)."""
        workdir = Path(workdir or tempfile.mkdtemp(prefix="megascale-mesh-"))
        workdir.mkdir(parents=True, exist_ok=True)
        mesh = cls(workdir=workdir)
        tag = f"{os.getpid()}-{next(_MESH_IDS)}"  # unique per mesh: shm names must not clash
        try:
            for i, ids in enumerate(expert_ids):
                url = f"shm://m2n-e{i}-{tag}" if transport == "shm" else "tcp://127.0.0.1:0"
                mesh.experts.append(spawn_role(
                    "expert", ["--model", str(model_dir), "--experts", ",".join(map(str, ids)),
                               "--m2n-url", url, "--m2n-sender-id", str(1000 + i),
                               *expert_args],
                    f"expert-{i}", workdir, env, workdir / f"expert-{i}.log",
                    cpus=expert_cpus))
            where = ["--expert-nodes", ",".join(e.grpc for e in mesh.experts)] \
                if mesh.experts else ["--local-experts"]
            for i in range(attention_replicas):
                url = f"shm://m2n-a{i}-{tag}" if transport == "shm" else "tcp://127.0.0.1:0"
                mesh.attention.append(spawn_role(
                    "attention", ["--model", str(model_dir), *where,
                                  "--m2n-url", url, "--m2n-sender-id", str(i),
                                  "--micro-batches", str(micro_batches), *attention_args],
                    f"attention-{i}", workdir, env, workdir / f"attention-{i}.log",
                    cpus=attention_cpus))
        except BaseException:
            mesh.stop()
            raise
        return mesh

    def stop(self) -> None:
        for p in [*self.attention, *self.experts]:
            p.stop()

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
