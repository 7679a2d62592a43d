"""How the roles of one deployment recognise each other, and what each may call.

Two mechanisms, usable together; with neither configured nothing is checked (a single-user
machine, the tests' default). The gateway's public APIs are guarded by its API key instead.

**Cluster token** (``--cluster-token-file`` / ``MEGASCALE_CLUSTER_TOKEN_FILE``: a Kubernetes
secret mounted as a file; ``megascale up`` writes one per launch; never on a command line).
A process that holds the token is of one role (``megascale serve ROLE``) and presents, on
every internal call its :func:`channel` makes, ``x-megascale-role: ROLE`` and
``x-megascale-credential: HMAC-SHA256(token, ROLE)`` (:func:`role_credential`). Servers
recompute the credential from the token, so a caller's role is proven, not claimed. A process
may instead be given a *role credential file* (:func:`write_role_credential`): it holds only
its own role's credential, can present it, and can derive nothing else. ``megascale up`` gives
the gateway (the role that faces the internet) such a file, so a compromised gateway can only
do what a gateway may. libm2n links prove the token itself in their HELLO (libm2n/auth.py).

**mTLS** (``--tls-cert-file``, ``--tls-key-file``, ``--tls-ca-file``: what cert-manager
writes into a secret). Every internal server requires a client certificate signed by the CA;
every internal client presents its own and checks the server's against the CA (the server's
certificate must name the DNS name :data:`TLS_SERVER_NAME`). The caller's role is the client
certificate's common name, ``ROLE`` or ``ROLE/NODE_ID``; with ``/NODE_ID`` the scheduler also
holds the node to its own node id. With mTLS each role holds only its own key: a compromised
node cannot act as another role. With a token as well, the credential's role must be the
certificate's.

Whatever proves the role, :data:`services.common.rights.RIGHTS` says which roles each method
accepts: no credential -> UNAUTHENTICATED, a role without the right -> PERMISSION_DENIED. A
handler reads who called with :func:`caller`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.common import rights
from services.errors import ConfigError

ROLE_KEY = "x-megascale-role"
CREDENTIAL_KEY = "x-megascale-credential"
TLS_SERVER_NAME = "megascale-internal"  # every internal server certificate names this DNS name
MIN_TOKEN_BYTES = 16
_ROLE_FILE_MAGIC = "megascale-role-credential v1"
_ROLE_CONTEXT = b"megascale role v1\0"


@dataclass(frozen=True)
class Caller:
    """Who made an internal call: a role of :data:`rights.ROLES`, and the node id when the
    credential names one (an mTLS certificate ``ROLE/NODE_ID``)."""

    role: str
    node_id: str | None = None


@dataclass(frozen=True)
class Credential:
    """What a process holds: the cluster ``token`` (proves and verifies any role), or only one
    ``role``'s ``role_credential`` (proves that role, verifies nothing)."""

    token: bytes | None = field(default=None, repr=False)
    role: str | None = None
    role_credential: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of this process's certificate, its key, and the cluster CA."""

    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    ca: bytes = field(repr=False)

    @classmethod
    def load(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        """The three files, or None when none is named; ConfigError naming the flag for a
        partial set or an unreadable file."""
        paths = {"--tls-cert-file": cert, "--tls-key-file": key, "--tls-ca-file": ca}
        if not any(paths.values()):
            return None
        missing = [f for f, p in paths.items() if not p]
        if missing:
            raise ConfigError(f"mTLS needs --tls-cert-file, --tls-key-file and --tls-ca-file; "
                              f"missing {', '.join(missing)}")
        data = []
        for flag, path in paths.items():
            try:
                data.append(Path(path).read_bytes())  # type: ignore[arg-type]
            except OSError as exc:
                raise ConfigError(f"{flag} {path}: {exc}") from None
            if b"-----BEGIN" not in data[-1]:
                raise ConfigError(f"{flag} {path} is not a PEM file")
        return cls(*data)


@dataclass
class _Config:
    credential: Credential = field(default_factory=Credential)
    role: str = "admin"
    tls: TlsFiles | None = None


_config = _Config()
_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("megascale_caller",
                                                                       default=None)


def role_credential(token: bytes, role: str) -> str:
    """The credential that proves ``role`` under ``token`` (hex HMAC-SHA256)."""
    return hmac.new(token, _ROLE_CONTEXT + role.encode(), hashlib.sha256).hexdigest()


def load_credential(path: str | Path | None) -> Credential:
    """The cluster token or role credential in ``path`` (empty Credential for no path).
    ConfigError for an unreadable, malformed or too short one."""
    if not path:
        return Credential()
    try:
        text = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster token file {path}: {exc}") from None
    if text.startswith(_ROLE_FILE_MAGIC.encode()):
        parts = text.decode(errors="replace").split()
        if len(parts) != 4 or parts[2] not in rights.ROLES or len(parts[3]) != 64:
            raise ConfigError(f"the role credential in {path} is malformed (expected "
                              f"'{_ROLE_FILE_MAGIC} ROLE HEX')")
        return Credential(role=parts[2], role_credential=parts[3])
    if len(text) < MIN_TOKEN_BYTES:
        raise ConfigError(f"the cluster token in {path} is shorter than {MIN_TOKEN_BYTES} bytes")
    return Credential(token=text)


def load_token(path: str | Path | None) -> bytes | None:
    """The cluster token in ``path`` (None for no path or a role credential file)."""
    return load_credential(path).token


def role_credential_file(token: bytes, role: str) -> str:
    """The text of ``role``'s credential file under ``token`` (:func:`load_credential` reads
    it)."""
    if role not in rights.ROLES:
        raise ValueError(f"unknown role {role!r}")
    return f"{_ROLE_FILE_MAGIC} {role} {role_credential(token, role)}\n"


def write_role_credential(path: Path, token: bytes, role: str) -> Path:
    """Write ``role``'s credential file under ``token`` to ``path`` (mode 0600)."""
    text = role_credential_file(token, role)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def configure(token: bytes | Credential | None, role: str = "admin",
              tls: TlsFiles | None = None) -> None:
    """Set this process's credentials (once, at start: ``megascale serve`` does it).
    ConfigError when a role credential file names another role than ``role``."""
    global _config
    if role not in rights.ROLES:
        raise ConfigError(f"unknown role {role!r}")
    cred = token if isinstance(token, Credential) else Credential(token=token)
    if cred.role is not None and cred.role != role:
        raise ConfigError(f"the cluster token file holds the {cred.role} role's credential; "
                          f"this process is {role}")
    _config = _Config(cred, role, tls)


def token() -> bytes | None:
    return _config.credential.token


def m2n_token() -> bytes | None:
    """What libm2n receivers require and senders present (``auth_token``)."""
    return _config.credential.token


def tls() -> TlsFiles | None:
    return _config.tls


def caller() -> Caller | None:
    """Who made the internal call being handled (None when this server checks nothing)."""
    return _caller.get()


def _presented() -> tuple[str, str] | None:
    """(role, credential) this process presents on its calls; None without a credential."""
    c = _config.credential
    if c.role_credential is not None:
        return (c.role or _config.role), c.role_credential
    if c.token is not None:
        return _config.role, role_credential(c.token, _config.role)
    return None


# ------------------------------------------------------------------------------ servers
def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for an internal gRPC server (none when nothing is configured).
    ConfigError for a process that holds only a role credential: it cannot verify callers."""
    c = _config.credential
    if c.token is None and c.role_credential is not None:
        raise ConfigError(f"a {c.role} role credential cannot verify callers: an internal "
                          "server needs the cluster token file")
    if c.token is None and _config.tls is None:
        return []
    return [_Guard(c.token, _config.tls is not None)]


def server_credentials() -> grpc.ServerCredentials | None:
    """mTLS server credentials (client certificates required), None without TLS."""
    t = _config.tls
    if t is None:
        return None
    return grpc.ssl_server_credentials([(t.key, t.cert)], root_certificates=t.ca,
                                       require_client_auth=True)


def identify(metadata: Sequence[tuple[str, Any]], auth_context: dict[str, list[bytes]] | None,
             token: bytes | None) -> tuple[Caller | None, str]:
    """The proven caller of a call, or (None, why not). ``auth_context`` is the TLS peer's
    (None when this server does not use TLS)."""
    cert_role = cert_node = None
    if auth_context is not None:
        names = auth_context.get("x509_common_name") or []
        if not names:
            return None, "no client certificate"
        cn = names[0].decode(errors="replace")
        cert_role, _, cert_node = cn.partition("/")
        if cert_role not in rights.ROLES:
            return None, f"the client certificate's common name {cn!r} names no role"
    if token is None:
        return Caller(cert_role, cert_node or None), ""  # type: ignore[arg-type]
    md = {k: v for k, v in metadata or ()}
    role, given = md.get(ROLE_KEY), md.get(CREDENTIAL_KEY)
    if isinstance(given, bytes):
        given = given.decode(errors="replace")
    if not role or not given:
        return None, f"missing {ROLE_KEY} / {CREDENTIAL_KEY} (this cluster requires them)"
    if role not in rights.ROLES or not hmac.compare_digest(
            given.encode(), role_credential(token, role).encode()):
        return None, f"wrong {CREDENTIAL_KEY} for role {role!r}"
    if cert_role is not None and role != cert_role:
        return None, f"credential for role {role!r} with a certificate for {cert_role!r}"
    return Caller(role, cert_node or None), ""


class _Guard(grpc.aio.ServerInterceptor):
    """Authenticates every call but the health probes, then checks the method's rights."""

    def __init__(self, token: bytes | None, use_tls: bool) -> None:
        self._token = token
        self._tls = use_tls

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or rights.is_open(details.method):
            return handler
        method = details.method

        async def check(context: grpc.aio.ServicerContext) -> None:
            who, why = identify(context.invocation_metadata() or (),
                                context.auth_context() if self._tls else None, self._token)
            if who is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            if not rights.allowed(method, who.role):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"role {who.role!r} may not call {method}")
            _caller.set(who)

        return _guarded(handler, check)


def _guarded(handler: grpc.RpcMethodHandler,
             check: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
             ) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that runs ``check`` first."""
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await inner_uu(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext):  # noqa: ANN202
            await check(context)
            async for item in inner_us(request, context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await inner_su(requests, context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext):  # noqa: ANN202
        await check(context)
        async for item in inner_ss(requests, context):
            yield item
    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


# ------------------------------------------------------------------------------ clients
def channel(address: str, options: Sequence[tuple[str, Any]] | None = None
            ) -> grpc.aio.Channel:
    """A channel to an internal gRPC service that presents this process's credentials: its
    role credential on every call, and its client certificate under mTLS."""
    presented = _presented()
    interceptors = [] if presented is None else [
        cls(presented) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    t = _config.tls
    if t is None:
        return grpc.aio.insecure_channel(address, options, interceptors=interceptors)
    creds = grpc.ssl_channel_credentials(root_certificates=t.ca, private_key=t.key,
                                         certificate_chain=t.cert)
    opts = [*(options or ()), ("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    return grpc.aio.secure_channel(address, creds, opts, interceptors=interceptors)


class _AddCredential:
    def __init__(self, presented: tuple[str, str]) -> None:
        self._role, self._credential = presented

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(ROLE_KEY, self._role)
        metadata.add(CREDENTIAL_KEY, self._credential)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class _UnaryUnary(_AddCredential, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request)


class _UnaryStream(_AddCredential, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request)


class _StreamUnary(_AddCredential, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddCredential, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request_iterator)
