"""Grouped float32 GEMM over weights packed once at load time (the C kernel in ``_cpu_gemm.c``).

The expert FFN's GEMMs are small at decode (a batch of 32 gives each of 8 experts ~8 rows), and
``torch._grouped_mm`` on CPU calls MKL once per group, which repacks the weight on every call;
this kernel reads weights that were packed once, so a call only streams them. It is used by
:func:`services.core.layers.grouped_expert_ffn` when :func:`usable` says so (CPU, float32,
AVX2 + FMA, output width a multiple of 16); everywhere else torch's path runs. The kernel is
single-threaded and releases the GIL: with :func:`kernel_threads` > 1 (a colocated replica
given every core) the groups are split into that many contiguous runs computed by a
small thread pool, so each thread streams a disjoint part of the weights.
The same kernel serves dense layers (:class:`PackedLinear`, :func:`linear`: the attention
projections and the LM head of a CPU float32 replica), a weight's panels split over the
threads: at decode (32 rows) MKL's sgemm reached 50-60 GFLOP/s on the 32000 x 1024 LM head of
a 2-vCPU EPYC with 2 threads, this kernel ~80 with one.
``MEGASCALE_CPU_GEMM=0`` in the environment (read at import) turns it off, for A/B runs.

Packed layout (:class:`PackedWeight`): a stack of ``G`` weights ``[K, N]`` (input-major, as
``x @ W``) becomes ``[G, N / 16, K, 16]``: each 16-column panel is ``K`` rows of 16 contiguous
floats, the order the kernel reads them in.
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

PANEL = 16
_API_VERSION = 3  # must match API_VERSION in _cpu_gemm.c


def load_extension(name: str, api_version: int, env: str) -> tuple[Any, str]:
    """(module, "") for the C extension ``services.core.<name>``, or (None, why not): turned
    off by ``env=0``, not built, built from another version of its source, or the CPU lacks
    AVX2/FMA (the module's ``supported()``)."""
    if os.environ.get(env) == "0":
        return None, f"{env}=0"
    try:
        mod = importlib.import_module(f"services.core.{name}")
    except ImportError as exc:
        return None, f"services.core.{name} is not built ({exc})"
    if getattr(mod, "API_VERSION", 0) != api_version:
        return None, f"services.core.{name} is stale: run pip install -e . --no-deps"
    if not mod.supported():
        return None, "this CPU lacks AVX2/FMA"
    return mod, ""


_ext, REASON = load_extension("_cpu_gemm", _API_VERSION, "MEGASCALE_CPU_GEMM")
ACTIVE: bool = _ext is not None


@dataclass(frozen=True)
class PackedWeight:
    """``G`` weights of shape ``[K, N]`` in the panel layout ``data [G, N / 16, K, 16]``."""

    data: torch.Tensor
    groups: int
    k: int
    n: int

    def __post_init__(self) -> None:
        # The kernel reads ``data`` through a raw pointer: its layout must be exactly this.
        want = (self.groups, self.n // PANEL, self.k, PANEL)
        if (self.n % PANEL or tuple(self.data.shape) != want or self.data.dtype != torch.float32
                or self.data.device.type != "cpu" or not self.data.is_contiguous()):
            raise ValueError(f"PackedWeight: data must be contiguous CPU float32 {list(want)} "
                             f"(N={self.n} a multiple of {PANEL}), got {self.data.dtype} "
                             f"{list(self.data.shape)} on {self.data.device}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical ``(G, K, N)`` shape, as the unpacked stack's."""
        return (self.groups, self.k, self.n)


def usable(w: torch.Tensor) -> bool:
    """Whether :func:`pack` + :func:`grouped_gemm` can serve the stacked weights ``w [G, K, N]``.

    Needs the kernel (built, AVX2 + FMA) and a CPU float32 stack whose ``N`` is a multiple of 16.
    """
    return (ACTIVE and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 3
            and w.shape[0] > 0 and w.shape[1] > 0 and w.shape[2] > 0 and w.shape[2] % PANEL == 0)


def pack(w: torch.Tensor) -> PackedWeight:
    """``w [G, K, N]`` (input-major stacked weights) -> :class:`PackedWeight` (a copy)."""
    G, K, N = w.shape
    if N % PANEL:
        raise ValueError(f"pack: N={N} is not a multiple of {PANEL}")
    data = w.reshape(G, K, N // PANEL, PANEL).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(data, G, K, N)


def grouped_gemm(x: torch.Tensor, w: PackedWeight, offs: torch.Tensor) -> torch.Tensor:
    """``y [M, N]``: rows ``offs[g-1]:offs[g]`` of ``x [M, K]`` times group ``g``'s weight.

    Same contract as ``torch._grouped_mm(x, w_unpacked, offs=offs)`` for 2-D ``x``, except that
    rows past ``offs[-1]`` are 0 (not left unset). ``offs`` [G] int32 end offsets; ValueError
    for offsets that are decreasing or past ``M`` (checked in C before any memory is read).
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"grouped_gemm: x must be CPU float32 [M, {w.k}], got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    if offs.dtype != torch.int32 or offs.shape != (w.groups,) or offs.device.type != "cpu":
        raise ValueError(f"grouped_gemm: offs must be CPU int32 [{w.groups}], got "
                         f"{offs.dtype} {tuple(offs.shape)}")
    if _ext is None:
        raise RuntimeError(f"the CPU grouped GEMM is not available: {REASON}")
    x, offs = x.contiguous(), offs.contiguous()
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    _run(x, w, offs, y)
    return y


def _run(x: torch.Tensor, w: PackedWeight, offs: torch.Tensor, y: torch.Tensor) -> None:
    """One kernel call per thread, each over a contiguous run of the output's 16-column panels
    in every group: the threads stream equal shares of every weight, balanced whatever the
    groups' row counts (prefill routes very unevenly)."""
    panels = w.n // PANEL
    runs = min(kernel_threads(), panels)
    cut = [(i * panels) // runs * PANEL for i in range(runs + 1)]
    args = (x.data_ptr(), x.shape[0], w.data.data_ptr(), y.data_ptr(), offs.data_ptr(),
            w.groups, w.k, w.n)
    futures = [worker_pool(runs - 1).submit(_ext.grouped_gemm, *args, n0, n1)
               for n0, n1 in zip(cut[1:-1], cut[2:], strict=True)] if runs > 1 else []
    try:
        _ext.grouped_gemm(*args, cut[0], cut[1])
    finally:  # the tensors must outlive every call reading them
        for f in futures:
            f.result()


_KERNEL_THREADS: int | None = None


def set_kernel_threads(threads: int | None) -> None:
    """How many threads this module's and cpu_attn's kernels split their work over (None:
    ``torch.get_num_threads()``)."""
    global _KERNEL_THREADS
    if threads is not None and threads < 1:
        raise ValueError(f"kernel threads must be >= 1, got {threads}")
    _KERNEL_THREADS = threads


def kernel_threads() -> int:
    """The thread count the kernels split their work over (:func:`set_kernel_threads`)."""
    return _KERNEL_THREADS if _KERNEL_THREADS is not None else torch.get_num_threads()


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool for C kernels that release the GIL (this module's and
    services/core/cpu_attn.py's), resized to ``workers``; calls run on it plus the caller."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(workers, thread_name_prefix="cpu-gemm"), workers
    return _POOL


@dataclass(frozen=True)
class PackedLinear:
    """A dense layer for :func:`linear`: the weight ``[N, K]`` (``F.linear``'s layout) packed as
    one group, and its bias ``[N]`` or None."""

    weight: PackedWeight
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.n


def linear_usable(w: torch.Tensor) -> bool:
    """Whether :func:`pack_linear` + :func:`linear` can serve ``F.linear``'s weight ``w [N, K]``
    (the kernel built and active, CPU float32, ``N`` a multiple of 16)."""
    return w.dim() == 2 and usable(w.t()[None])


def pack_linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """``F.linear``'s ``w [N, K]`` (and ``bias``) -> :class:`PackedLinear` (a copy)."""
    return PackedLinear(pack(w.t()[None]), bias)


def linear(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """``F.linear(x, W, b)`` for CPU float32 ``x [..., K]``: ``[..., N]``. With
    :func:`kernel_threads` > 1 the weight's panels are split into that many contiguous
    runs, one kernel call each (the kernel releases the GIL)."""
    w = layer.weight
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != w.k:
        raise ValueError(f"linear: x must be CPU float32 [..., {w.k}], got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if _ext is None:
        raise RuntimeError(f"the CPU GEMM is not available: {REASON}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k).contiguous()
    y = torch.empty(x2.shape[0], w.n, dtype=torch.float32)
    if x2.shape[0]:
        _run(x2, w, torch.tensor([x2.shape[0]], dtype=torch.int32), y)
    if layer.bias is not None:
        y += layer.bias
    return y.view(*lead, w.n)
