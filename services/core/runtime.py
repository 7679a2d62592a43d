"""Process-level runtime settings every compute process applies once at start.

Two processes must not fight over the cores they share, so each role sets torch's intra-op threads
explicitly (``--threads`` flag, else ``MEGASCALE_TORCH_THREADS``, else 1) instead of letting torch
take every core.
"""

from __future__ import annotations

import os

from services.errors import ConfigError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def configure_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the kernel at once.

    A decode step allocates many activation tensors of a few hundred KB to a few MB whose
    shapes change every step (the context grows). With glibc's defaults each such allocation
    is a fresh ``mmap`` whose pages fault in on first touch and go back to the kernel on free:
    measured here, an attention block took 10–15 ms instead of 6–7 ms. Raising the mmap and
    trim thresholds lets malloc reuse the heap (the usual remedy is jemalloc/tcmalloc via
    LD_PRELOAD; this needs no extra library). No-op where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def configure_threads(threads: int | None = None, device: str = "cpu",
                      dtype: str = "float32") -> int:
    """Set the compute thread counts (and the allocator, see :func:`configure_allocator`);
    returns the thread count applied.

    The C kernels (services/core/cpu_gemm.py, cpu_attn.py) split their work over
    ``threads``. A CPU float32 process runs its heavy ops there (expert GEMMs, dense
    projections, LM head, decode attention), so torch keeps one intra-op thread: its
    remaining ops are small, and waking an OpenMP team for each cost more than it saved
    (index_add_ of a [32, 1024] step: 13 us on one thread, 350 us on two; a decode step of
    the 0.49B Mixtral 109 -> 99 ms). Elsewhere torch gets ``threads``."""
    import torch

    from services.core import cpu_gemm

    configure_allocator()

    if threads is None:
        raw = os.environ.get("MEGASCALE_TORCH_THREADS", "1")
        try:
            threads = int(raw)
        except ValueError:
            raise ConfigError(f"MEGASCALE_TORCH_THREADS must be an integer, got {raw!r}") from None
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    cpu_gemm.set_kernel_threads(threads)
    on_kernels = device == "cpu" and dtype == "float32" and cpu_gemm.ACTIVE
    torch.set_num_threads(1 if on_kernels else threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work started) in this process
        pass
    return threads


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # --dtype of the compute roles


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


def gpu_memory_budget(device: str | object, fraction: float, reserve_bytes: int) -> int:
    """Bytes this process may still allocate on a CUDA ``device`` (vLLM's
    ``--gpu-memory-utilization``): ``fraction`` of the card's memory less what this process
    holds already and ``reserve_bytes`` kept for activations, and never more than is free now
    (other processes on the same card: expert nodes started first)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    mine = torch.cuda.memory_reserved(device)
    return int(min(fraction * total - mine, free) - reserve_bytes)
