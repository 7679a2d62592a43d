"""The cluster token: how the roles of one deployment recognise each other.

A deployment shares one secret token, read from the file ``--cluster-token-file`` names
(``MEGASCALE_CLUSTER_TOKEN_FILE``; a Kubernetes secret mounted as a file; ``megascale up``
writes one per launch). Never on a command line. With a token configured:

- every internal gRPC service (Scheduler, Attention, Expert) refuses a call without
  ``x-megascale-cluster-token: TOKEN`` metadata with UNAUTHENTICATED (the gRPC health service
  stays open for probes);
- every internal gRPC client made by :func:`channel` sends it;
- every libm2n receiver admits only senders whose HELLO proves the token (libm2n/auth.py), and
  every sender proves it (:func:`m2n_token`).

Without a token nothing is checked (a single-user machine, the tests' default). The gateway's
public APIs are guarded by its API key instead.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.errors import ConfigError

METADATA_KEY = "x-megascale-cluster-token"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # liveness/readiness probes carry no secret
MIN_TOKEN_BYTES = 16

_token: bytes | None = None


def load_token(path: str | Path | None) -> bytes | None:
    """The token in ``path`` (surrounding white space dropped); None for no path. ConfigError
    for an unreadable or too short token."""
    if not path:
        return None
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster token file {path}: {exc}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"the cluster token in {path} is shorter than {MIN_TOKEN_BYTES} bytes")
    return token


def configure(token: bytes | None) -> None:
    """Set this process's cluster token (once, at start: ``megascale serve`` does it)."""
    global _token
    _token = token


def token() -> bytes | None:
    return _token


def m2n_token() -> bytes | None:
    """What libm2n receivers require and senders present (``auth_token``)."""
    return _token


# ------------------------------------------------------------------------------ servers
def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for an internal gRPC server (none without a token)."""
    return [] if _token is None else [_TokenCheck(_token)]


class _TokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: bytes) -> None:
        self._token = token

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        for key, value in details.invocation_metadata or ():
            if key == METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._token):
                    return handler
                break
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        f"missing or wrong {METADATA_KEY} (this cluster requires its token)")


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext):  # noqa: ANN201
    await _refuse(request, context)
    yield  # an async generator, as a streaming handler must be


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only refuses."""
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_refuse, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_refuse_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(_refuse_stream, **kw)


# ------------------------------------------------------------------------------ clients
def channel(address: str, options: Sequence[tuple[str, Any]] | None = None
            ) -> grpc.aio.Channel:
    """A channel to an internal gRPC service that presents this process's token (if any)."""
    interceptors = [] if _token is None else [
        cls(_token.decode()) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary,
                                         _StreamStream)]
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


class _AddToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(METADATA_KEY, self._token)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request_iterator)
