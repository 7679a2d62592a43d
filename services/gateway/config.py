"""The gateway's configuration (built from flags by :mod:`services.gateway.main`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.core.request import MAX_ATTEMPTS, model_id
from services.errors import ConfigError
from services.gateway.tools import TOOL_CALL_PARSERS

_ADDRESS = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


@dataclass(frozen=True)
class GatewayConfig:
    """Where to listen, which model, which replicas.

    ``attention`` is a static list of replica gRPC addresses; ``scheduler`` (if set) is asked
    ``PickReplica`` for each request instead. At least one of the two is required.
    ``max_model_len`` 0 = take it from the checkpoint (config.json max_position_embeddings).
    """

    model_dir: str
    served_model_name: str = ""
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int | None = None
    node_id: str = "gateway"
    attention: tuple[str, ...] = ()
    scheduler: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_model_len: int = 0
    request_timeout_s: float = 600.0
    max_attempts: int = 3  # replicas tried per request (failover and resume)
    tool_call_parser: str = "hermes"  # finds tool calls in text (services/gateway/tools.py)
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins allowed ("*" = any); () = off

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ConfigError(f"--model: no config.json in {self.model_dir!r}")
        if not self.served_model_name:
            name = model_id(self.model_dir) or "model"
            object.__setattr__(self, "served_model_name", name)
        for flag, port in (("--port", self.http_port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{flag} must be in 0..65535, got {port}")
        if not self.attention and not self.scheduler:
            raise ConfigError("give --attention ADDR[,ADDR] or --scheduler ADDR")
        for addr in (*self.attention, *([self.scheduler] if self.scheduler else [])):
            if not _ADDRESS.match(addr):
                raise ConfigError(f"bad gRPC address {addr!r}: expected HOST:PORT")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_model_len < 0:
            raise ConfigError(f"--max-model-len must be >= 0, got {self.max_model_len}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout must be > 0, got {self.request_timeout_s}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}"
                              f", got {self.tool_call_parser!r}")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ConfigError(f"--max-attempts must be in 1..{MAX_ATTEMPTS}, got "
                              f"{self.max_attempts}")
