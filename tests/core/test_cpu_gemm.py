"""The packed-weight CPU grouped GEMM (services/core/_cpu_gemm.c) against float64 references."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from services.core import cpu_gemm
from services.core.model import ExpertSide


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


needs_kernel = pytest.mark.skipif(not cpu_gemm.ACTIVE, reason=f"kernel off: {cpu_gemm.REASON}")


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    cpu_gemm.set_kernel_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        cpu_gemm.set_kernel_threads(None)


def _reference(x: torch.Tensor, w: torch.Tensor, offs: list[int]) -> torch.Tensor:
    y = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offs):
        y[start:end] = x[start:end].double() @ w[g].double()
        start = end
    return y


@pytest.mark.skipif(not _cpu_has_avx2_fma() or os.environ.get("MEGASCALE_CPU_GEMM") == "0",
                    reason="no AVX2/FMA here, or turned off")
def test_kernel_is_built_and_active():
    # The install builds it (pyproject ext-modules): a silent fallback would hide a build break.
    assert cpu_gemm.ACTIVE, cpu_gemm.REASON


@needs_kernel
@pytest.mark.parametrize("G,K,N,sizes", [
    (8, 128, 512, [8, 7, 9, 0, 8, 10, 6, 8]),    # decode-sized groups, one empty
    (3, 256, 16, [1, 2, 3]),                     # narrowest output, every row-tile width
    (2, 1024, 32, [130, 70]),                    # rows span several L2 row blocks
    (4, 5, 48, [0, 0, 13, 0]),                   # odd K; only one group has rows
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_grouped_gemm_matches_float64(G, K, N, sizes, threads):
    g = torch.Generator().manual_seed(G * K + N)
    extra = 3  # rows past offs[-1] (masked "no expert" rows) must come back as 0
    x = torch.randn(sum(sizes) + extra, K, generator=g)
    w = torch.randn(G, K, N, generator=g)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    packed = cpu_gemm.pack(w)
    assert packed.shape == (G, K, N)
    with torch_threads(threads):  # > 1: runs of groups on the kernel's thread pool
        y = cpu_gemm.grouped_gemm(x, packed, offs)
    want = _reference(x, w, offs.tolist())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4 * K ** 0.5)
    assert torch.count_nonzero(y[sum(sizes):]) == 0
    if K % 4 == 0:  # torch's own grouped GEMM (16-byte strides only) agrees where it is defined
        ref = torch._grouped_mm(x, w, offs=offs)[:sum(sizes)]
        torch.testing.assert_close(y[:sum(sizes)], ref, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_bad_input_is_rejected_before_memory_is_read():
    w = cpu_gemm.pack(torch.randn(2, 8, 16))
    x = torch.randn(5, 8)
    for threads in (1, 2):
        for offs, msg in (([3, 2], "outside"), ([2, 6], "outside"), ([-1, 5], "outside")):
            with torch_threads(threads), pytest.raises(ValueError, match=msg):
                cpu_gemm.grouped_gemm(x, w, torch.tensor(offs, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        cpu_gemm.grouped_gemm(x, w, torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="float32"):
        cpu_gemm.grouped_gemm(x.double(), w, torch.tensor([2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[M, 8\]"):
        cpu_gemm.grouped_gemm(torch.randn(5, 9), w, torch.tensor([2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_gemm.pack(torch.randn(2, 8, 20))
    with pytest.raises(ValueError, match="contiguous CPU float32"):  # a layout the C side misreads
        cpu_gemm.PackedWeight(w.data.transpose(2, 3), 2, 8, 16)
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        cpu_gemm.PackedWeight(w.data, 2, 16, 16)


@needs_kernel
def test_expert_side_packs_only_where_the_kernel_fits(ckpt_factory):
    path = ckpt_factory("mixtral")
    assert ExpertSide.from_pretrained(path).packed
    with torch_threads(2):  # the kernel splits runs of experts over threads
        assert ExpertSide.from_pretrained(path).packed
    assert not ExpertSide.from_pretrained(path, dtype=torch.bfloat16).packed
    assert not ExpertSide.from_pretrained(path, []).packed  # nothing to pack


def test_environment_switch_turns_the_kernel_off():
    code = "from services.core import cpu_gemm; print(cpu_gemm.ACTIVE, cpu_gemm.REASON)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MEGASCALE_CPU_GEMM": "0"}, timeout=120)
    assert out.stdout.strip() == "False MEGASCALE_CPU_GEMM=0"


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,N,K,bias", [
    (32, 4096, 1024, False),   # decode rows, the panels split over the threads
    (1, 48, 7, True),          # 3 panels, odd K, one row, with a bias
    (300, 16, 64, False),      # one panel (no split possible), rows over several tiles
    (0, 32, 8, True),          # no rows
])
def test_linear_matches_float64(threads, M, N, K, bias):
    g = torch.Generator().manual_seed(M + N + K)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(2, M, K, generator=g)[1]  # a strided view: linear makes it contiguous
    with torch_threads(threads):
        y = cpu_gemm.linear(x, cpu_gemm.pack_linear(w, b))
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * K ** 0.5, rtol=1e-5)


@needs_kernel
def test_linear_keeps_leading_dims_and_refuses_what_it_cannot_serve():
    from services.core import layers
    w = torch.randn(32, 8)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layers.linear(x, *layers.packed_or(w)), x @ w.t())
    assert isinstance(layers.packed_or(w)[0], cpu_gemm.PackedLinear)
    odd = torch.randn(24, 8)  # N not a multiple of 16: torch serves it
    assert layers.packed_or(odd)[0] is odd
    assert layers.packed_or(w.half())[0].dtype == torch.float16
    with pytest.raises(ValueError, match="linear: x must be"):
        cpu_gemm.linear(x.double(), cpu_gemm.pack_linear(w))


def test_configure_threads_gives_the_kernels_the_threads_on_cpu_float32():
    from services.core.runtime import configure_threads
    old = torch.get_num_threads()
    try:
        configure_threads(2, "cpu", "float32")
        assert cpu_gemm.kernel_threads() == 2
        assert torch.get_num_threads() == (1 if cpu_gemm.ACTIVE else 2)
        configure_threads(2, "cpu", "bfloat16")  # torch runs the heavy ops: it gets them
        assert torch.get_num_threads() == 2 and cpu_gemm.kernel_threads() == 2
    finally:
        torch.set_num_threads(old)
        cpu_gemm.set_kernel_threads(None)
