"""The gateway's one error type, shaped for both front doors.

A :class:`GatewayError` carries an HTTP status, the OpenAI error ``type``/``param``/``code`` and
the matching gRPC status code, so the REST app and the gRPC front door report the same problem
the same way. ``rpc_error_to_gateway`` maps an attention replica's (or the scheduler's) gRPC
status to it (the table is in attention.proto / gateway.proto).
"""

from __future__ import annotations

from typing import Any

import grpc

from services.core.request import InvalidField


class GatewayError(Exception):
    """A request failed; ``message`` is one line naming the problem."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str | None = None, code: str | None = None,
                 grpc_code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.code = code
        self.grpc_code = grpc_code or _GRPC.get(status, grpc.StatusCode.INTERNAL)

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param)


def invalid_field(exc: InvalidField, prefix: str = "",
                  names: dict[str, str] | None = None) -> GatewayError:
    """A 400 for a field :mod:`services.core.request` refused, under the name the client used
    (``names`` renames, e.g. max_tokens -> max_completion_tokens; ``prefix`` nests it, e.g.
    ``sampling.``)."""
    field = (names or {}).get(exc.field, exc.field)
    message = str(exc)
    if message.startswith(exc.field):
        message = field + message[len(exc.field):]
    return bad_request(prefix + message, prefix + field)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ALREADY_EXISTS,
         413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}

# Downstream status -> HTTP status at the gateway.
_FROM_RPC = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
             grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
             grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
             grpc.StatusCode.CANCELLED: 499}


def rpc_error_to_gateway(exc: grpc.aio.AioRpcError, where: str) -> GatewayError:
    """Map a downstream gRPC failure; unknown codes become 502 (the replica misbehaved)."""
    return status_to_gateway(exc.code(), exc.details() or "", where)


def status_to_gateway(code: grpc.StatusCode, details: str, where: str) -> GatewayError:
    """Map a downstream status (a failed call, or a GenerateStream refusal)."""
    status = _FROM_RPC.get(code, 502)
    detail = details.splitlines()[0] if details else code.name
    msg = detail if status == 400 else f"{where}: {code.name}: {detail}"
    return GatewayError(status, msg, grpc_code=code if status != 502 else grpc.StatusCode.INTERNAL,
                        type=None if status != 502 else "server_error")
