"""Process-level runtime settings every compute process applies once at start.

Two processes must not fight over the cores they share, so each role sets torch's intra-op threads
explicitly (``--threads`` flag, else ``MEGASCALE_TORCH_THREADS``, else 1) instead of letting torch
take every core.
"""

from __future__ import annotations

import os

from services.errors import ConfigError


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op and inter-op thread counts; returns the count applied."""
    import torch

    if threads is None:
        raw = os.environ.get("MEGASCALE_TORCH_THREADS", "1")
        try:
            threads = int(raw)
        except ValueError:
            raise ConfigError(f"MEGASCALE_TORCH_THREADS must be an integer, got {raw!r}") from None
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work started) in this process
        pass
    return threads


def pick_device(name: str = "auto") -> str:
    """Resolve ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``; validate explicit names."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return name
