"""The life of a role process, shared by every role: start its servers, say it is ready,
register with the scheduler, wait, and shut down in the right order.

Each role's ``serve(config, ready_file, stop)`` builds its own parts inside one
:class:`RoleLifecycle`::

    async with RoleLifecycle("expert", config.node_id, config.host,
                             config.advertise_host) as life:
        rx = libm2n.open_receiver(...)
        life.defer(rx.close)                             # anything to undo at shutdown
        life.start_thread(worker.run, "expert-drain")   # a loop thread, stopped at shutdown
        await life.start_grpc(config.grpc_port, add_servicers, service_names)
        life.serve_metrics(registry, config.metrics_port)
        await life.ready(ready_file, {"m2n_url": ...}, config.scheduler,
                         common_pb2.NodeInfo(role=..., m2n_url=...), on_placement=...)
        await life.wait(stop)

``megascale serve`` (services/launch/serve.py) sets ``stop`` on SIGTERM or SIGINT. Whatever
ends the block (``stop``, or an error while starting), shutdown runs in reverse order of start:
deregister (the scheduler stops routing to the node at once), stop the gRPC server with a grace
period (in-flight calls finish), then every ``defer``-ed cleanup (threads, libm2n links: shared
memory is unlinked), last the tracing exporter (flushed). The metrics server is a daemon thread
that ends with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from megascale.v1 import common_pb2
from services.common import auth, tracing
from services.common.grpcserver import start_server
from services.common.heap import freeze_startup_heap
from services.common.metrics import serve_metrics
from services.common.net import advertise_host
from services.common.readyfile import write_ready_file
from services.common.registration import NodeRegistration

GRPC_GRACE_S = 1.0  # in-flight calls get this long to finish at shutdown


class RoleLifecycle:
    """One role process's start-up and shutdown (module docstring). An async context manager."""

    def __init__(self, role: str, node_id: str, host: str, advertise: str | None = None
                 ) -> None:
        self.role = role
        self.node_id = node_id
        self.host = host                                  # what the servers bind
        self.advertised = advertise_host(host, advertise)  # what peers dial
        self.grpc_port = 0                                # bound port once start_grpc ran
        self.grpc_address = ""                            # "HOST:PORT" once start_grpc ran
        self.metrics_port: int | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> RoleLifecycle:
        tracing.setup_tracing(f"megascale-{self.role}")
        self._stack.callback(tracing.shutdown_tracing)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at shutdown (a coroutine function is awaited), before whatever was
        deferred earlier."""
        if inspect.iscoroutinefunction(fn):
            self._stack.push_async_callback(fn, *args)
        else:
            self._stack.callback(fn, *args)

    def start_thread(self, run: Callable[[threading.Event], Any], name: str,
                     join_s: float = 10.0) -> threading.Thread:
        """Run ``run(stop_event)`` in a daemon thread (an engine or drain loop); at shutdown the
        event is set and the thread joined for up to ``join_s`` seconds."""
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(stop,), name=name, daemon=True)
        thread.start()
        self.defer(thread.join, join_s)
        self.defer(stop.set)
        return thread

    async def start_grpc(self, port: int, add_servicers: Callable[[grpc.aio.Server], None],
                         service_names: Iterable[str], internal: bool = True) -> int:
        """Bind and start the role's gRPC server (health and reflection included); returns the
        bound port. An ``internal`` service requires a proven role with the method's right, and
        speaks mTLS, when configured (services/common/auth.py); the gateway's public one has
        its API key instead."""
        server, bound, _health = await start_server(
            self.host, port, add_servicers, service_names,
            auth.server_interceptors() if internal else (),
            auth.server_credentials() if internal else None)
        self._stack.push_async_callback(server.stop, GRPC_GRACE_S)
        self.grpc_port = bound
        self.grpc_address = f"{self.advertised}:{bound}"
        return bound

    def serve_metrics(self, registry: CollectorRegistry, port: int | None) -> int | None:
        """Prometheus ``/metrics`` on ``port`` (None: off, 0: pick a free one)."""
        self.metrics_port = serve_metrics(registry, self.host, port)
        return self.metrics_port

    async def ready(self, ready_file: str | None, info: dict[str, Any] | None = None,
                    scheduler: str | None = None, node: common_pb2.NodeInfo | None = None,
                    **callbacks: Any) -> None:
        """Everything listens: freeze the start-up heap, write the ready file (role, node id,
        gRPC address, metrics port and ``info``), then, given a ``scheduler`` address, keep
        ``node`` registered with it (:class:`NodeRegistration`, with ``callbacks``: load_fn,
        on_placement, on_settings); its node id, gRPC address and start time are filled in
        here."""
        freeze_startup_heap()
        write_ready_file(ready_file, {"role": self.role, "node_id": self.node_id,
                                      "grpc": self.grpc_address,
                                      "metrics_port": self.metrics_port, **(info or {})})
        if scheduler:
            node = common_pb2.NodeInfo() if node is None else node
            node.node_id, node.grpc_address = self.node_id, self.grpc_address
            node.started_at_unix_s = time.time()
            registration = NodeRegistration(scheduler, node, **callbacks)
            await registration.start()
            self._stack.push_async_callback(registration.stop)

    async def wait(self, stop: asyncio.Event | None, *also: Awaitable[Any]) -> None:
        """Until ``stop`` is set (forever when None) or one of ``also`` ends (its error is
        raised)."""
        stopped = asyncio.ensure_future((stop or asyncio.Event()).wait())
        tasks = {stopped, *(asyncio.ensure_future(a) for a in also)}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        for task in done - {stopped}:
            task.result()
