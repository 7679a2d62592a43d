"""Calling internal RPCs as a given role, and reading the status a call ended with."""

from __future__ import annotations

import grpc

from services.common import auth


def as_role(token: bytes, role: str) -> list[tuple[str, str]]:
    """gRPC metadata that presents ``role``'s credential under the cluster ``token``."""
    return [(auth.ROLE_KEY, role), (auth.CREDENTIAL_KEY, auth.role_credential(token, role))]


async def status_of(call) -> grpc.StatusCode:  # noqa: ANN001 - any awaitable aio call
    """OK, or the status code the call failed with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
