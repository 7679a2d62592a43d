"""Command-line flags shared by the role processes (``megascale serve ROLE``).

Every flag can also come from the environment as ``MEGASCALE_<FLAG>`` (``--grpc-port`` ->
``MEGASCALE_GRPC_PORT``), which is how the Helm chart configures pods; a flag given on the
command line wins.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from services.core.runtime import COMPUTE_DTYPES
from services.errors import ConfigError


def env_value(flag: str, default: Any = None) -> Any:
    return os.environ.get("MEGASCALE_" + flag.lstrip("-").upper().replace("-", "_"), default)


def add_flag(p: argparse.ArgumentParser, flag: str, **kw: Any) -> None:
    """``p.add_argument(flag, **kw)`` whose default comes from MEGASCALE_FLAG when set."""
    env = env_value(flag)
    if env is not None:
        boolean = kw.get("action") is argparse.BooleanOptionalAction
        kw["default"] = flag_bool(env, flag) if boolean else kw.get("type", str)(env)
        kw.pop("required", None)
    p.add_argument(flag, **kw)


def flag_bool(value: str, flag: str) -> bool:
    """A boolean flag's value from the environment (1/true/yes/on, 0/false/no/off)."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{flag}: expected true or false, got {value!r}")


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Flags every role has: where to listen, metrics, ready file, logging."""
    add_flag(p, "--node-id", help="node id (default: ROLE-PID)")
    add_flag(p, "--host", default="127.0.0.1", help="address to bind")
    add_flag(p, "--advertise-host", default=None,
             help="address peers should dial (default: --host; the pod IP in Kubernetes)")
    add_flag(p, "--grpc-port", type=int, default=0, help="gRPC port (0 = pick a free one)")
    add_flag(p, "--metrics-port", type=int, default=None,
             help="Prometheus /metrics port (0 = pick a free one; unset = off)")
    add_flag(p, "--ready-file", default=None,
             help="write a JSON with the bound addresses here once serving")
    add_flag(p, "--log-level", default="INFO")
    add_flag(p, "--cluster-token-file", default=None,
             help="file holding the deployment's shared secret (or this role's credential): "
                  "internal gRPC calls and libm2n links must prove it "
                  "(services/common/auth.py); unset = no checks")
    add_flag(p, "--tls-cert-file", default=None,
             help="PEM certificate of this process (common name ROLE or ROLE/NODE_ID, DNS "
                  "name megascale-internal): internal gRPC links use mTLS")
    add_flag(p, "--tls-key-file", default=None, help="PEM private key of --tls-cert-file")
    add_flag(p, "--tls-ca-file", default=None,
             help="PEM CA that signs every internal certificate (peers must present one)")


def add_compute_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the roles that run the model (attention, expert)."""
    add_flag(p, "--model", required=True, help="checkpoint directory (Hugging Face layout)")
    add_flag(p, "--m2n-url", default="tcp://127.0.0.1:0",
             help="libm2n receive URL: tcp://HOST:PORT (port 0 = pick) or shm://NAME")
    add_flag(p, "--threads", type=int, default=None,
             help="torch threads (default: MEGASCALE_TORCH_THREADS or 1)")
    add_flag(p, "--device", default="cpu", help="cpu | cuda[:N] | auto")
    add_flag(p, "--dtype", default="float32", choices=COMPUTE_DTYPES,
             help="compute dtype; activations travel between roles in it")


def secret_from(value: str | None, path: str | None, flag: str) -> str | None:
    """A secret given directly (``--X``, better as ``MEGASCALE_X`` in the environment: argv is
    visible in ``ps``) or in a file (``--X-file``); ConfigError when both are given or the
    file cannot be read."""
    if value and path:
        raise ConfigError(f"give {flag} or {flag}-file, not both")
    if not path:
        return value or None
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag}-file {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{flag}-file {path} is empty")
    return secret


def threads_from(args: argparse.Namespace) -> int:
    return args.threads if args.threads is not None else int(env_value("torch-threads", "1"))
