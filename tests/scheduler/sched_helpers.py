"""Helpers for the scheduler tests: in-process schedulers on real Redis, a restartable Redis,
NodeInfo builders. Imported by the tests as ``sched_helpers`` (pytest puts this folder on
sys.path)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from megascale.v1 import common_pb2, scheduler_pb2_grpc
from services.scheduler.config import SchedulerConfig
from services.scheduler.server import Scheduler


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A redis-server of our own (start / kill / start again on the same port)."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start within 10 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def make_config(redis_url: str, **kw: Any) -> SchedulerConfig:
    """A test config: its own key prefix (tests share one Redis), short lease."""
    base: dict[str, Any] = dict(redis_url=redis_url, num_experts=4,
                                key_prefix=f"t{uuid.uuid4().hex[:10]}:", node_ttl_s=1.0,
                                stats_interval_s=0.5, rpc_timeout_s=1.0)
    base.update(kw)
    return SchedulerConfig(**base)


class Running:
    """An in-process scheduler plus a client stub to it."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.channel = grpc.aio.insecure_channel(sched.address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
        await self.sched.stop()


async def start_scheduler(config: SchedulerConfig) -> Running:
    sched = Scheduler(config)
    await sched.start()
    return Running(sched)


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    """Run an async test body with an overall deadline (a hang fails, never blocks)."""
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


async def eventually(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``cond`` (sync or async) until truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        out = cond()
        if asyncio.iscoroutine(out):
            out = await out
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.05)


def attention_info(node_id: str, port: int, **kw: Any) -> common_pb2.NodeInfo:
    base: dict[str, Any] = dict(node_id=node_id, role=common_pb2.NODE_ROLE_ATTENTION,
                                grpc_address=f"127.0.0.1:{port}", m2n_url="tcp://127.0.0.1:1",
                                model="demo", kv_blocks=64, kv_block_size=16,
                                max_running_requests=8)
    base.update(kw)
    return common_pb2.NodeInfo(**base)


def expert_info(node_id: str, port: int, expert_ids: list[int], **kw: Any
                ) -> common_pb2.NodeInfo:
    base: dict[str, Any] = dict(node_id=node_id, role=common_pb2.NODE_ROLE_EXPERT,
                                grpc_address=f"127.0.0.1:{port}",
                                m2n_url=f"tcp://127.0.0.1:{port + 1}", model="demo",
                                expert_ids=expert_ids)
    base.update(kw)
    return common_pb2.NodeInfo(**base)
