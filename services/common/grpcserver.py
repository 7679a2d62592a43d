"""Start a role's grpc.aio server with the standard health service and reflection."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.errors import ConfigError

# Large enough for long prompts in one GenerateRequest; bad input beyond it is refused by gRPC.
MAX_MESSAGE_BYTES = 64 << 20


async def start_server(host: str, port: int, add_servicers: Callable[[grpc.aio.Server], None],
                       service_names: Iterable[str],
                       interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                       credentials: grpc.ServerCredentials | None = None
                       ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Bind ``host:port`` (0 picks a free port), register servicers + health + reflection.
    With ``credentials`` the port speaks TLS (services/common/auth.py: mTLS).

    Returns ``(server, bound_port, health_servicer)``; every service starts as SERVING.
    """
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    bound = (server.add_insecure_port(f"{host}:{port}") if credentials is None
             else server.add_secure_port(f"{host}:{port}", credentials))
    if bound == 0:
        raise ConfigError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
