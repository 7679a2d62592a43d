/*
 * services.core._cpu_gemm: grouped float32 GEMM over pre-packed weights (x86-64 AVX2 + FMA).
 *
 * Why: the expert FFN runs one small GEMM per expert (a decode batch of 32 gives each of 8
 * experts ~8 rows). torch._grouped_mm on CPU loops over groups calling MKL sgemm, and MKL
 * repacks the whole weight matrix into panels on every call: measured on a 2-vCPU AMD EPYC, a
 * third of the reference decode time went to that copy (mkl_blas_def_sgemm_scopy_*). Here the
 * weights are packed once at load time (services/core/cpu_gemm.py: pack), so a call only
 * streams them.
 *
 * Wire format of the arguments (validated by the Python wrapper; offsets re-checked here since
 * they index memory):
 *   x     [M, K]           float32, row-major, contiguous
 *   w     [G, N/16, K, 16] float32: group g's [K, N] weight cut into 16-column panels, each
 *                          panel K rows of 16 contiguous floats
 *   y     [M, N]           float32 output; rows of group g are offs[g-1]..offs[g] (offs[-1] = 0)
 *   offs  [G]              int32 end offsets, non-decreasing, offs[G-1] <= M; rows past
 *                          offs[G-1] are set to 0
 * Each output element is one sequential FMA chain over k = 0..K-1 (deterministic; it agrees
 * with MKL to rounding, bit for bit where MKL does not split K).
 */
#include "_cpu_kernel.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define API_VERSION 3
#define NR 16 /* panel width: two 8-float AVX registers */
#define MR 6  /* rows per micro-tile: 12 accumulators + 2 panel loads + 1 broadcast = 15 ymm */
/* Software prefetch distance, in panel rows (64 bytes each). At a few rows per tile the k loop
 * outruns the hardware prefetcher (it stops at 4 KB pages): prefetching 4 KB ahead made 8 rows
 * x [1024, 4096] 25% faster on a 2-vCPU EPYC. One or two rows are bound by the FMA latency
 * instead, and there the extra instruction only costs, so they go without. */
#define PREFETCH_ROWS 64

#define ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

/* y[0:mr, 0:16] = x[0:mr, 0:K] @ panel[0:K, 0:16]; mr is a compile-time constant at each call
 * site (always_inline), so the accumulators are plain variables GCC keeps in registers (an
 * array of them spills to the stack on every iteration: measured 2x slower). */
__attribute__((target("avx2,fma"), always_inline)) static inline void
tile(const int mr, const float *x, long ldx, const float *panel, float *y, long ldy, long K)
{
#define DECL(r) __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps();
    ROWS(DECL)
    for (long k = 0; k < K; k++) {
        if (mr >= 3) _mm_prefetch((const char *)(panel + (k + PREFETCH_ROWS) * NR), _MM_HINT_T0);
        const __m256 b0 = _mm256_loadu_ps(panel + k * NR), b1 = _mm256_loadu_ps(panel + k * NR + 8);
#define FMA(r)                                                       \
    if (mr > r) {                                                    \
        const __m256 s = _mm256_broadcast_ss(x + r * ldx + k);       \
        a##r##0 = _mm256_fmadd_ps(s, b0, a##r##0);                   \
        a##r##1 = _mm256_fmadd_ps(s, b1, a##r##1);                   \
    }
        ROWS(FMA)
    }
#define STORE(r)                                                     \
    if (mr > r) {                                                    \
        _mm256_storeu_ps(y + r * ldy, a##r##0);                      \
        _mm256_storeu_ps(y + r * ldy + 8, a##r##1);                  \
    }
    ROWS(STORE)
}

#define TILE_FN(n)                                                                        \
    __attribute__((target("avx2,fma"))) static void tile##n(const float *x, long ldx,    \
        const float *panel, float *y, long ldy, long K) { tile(n, x, ldx, panel, y, ldy, K); }
TILE_FN(1) TILE_FN(2) TILE_FN(3) TILE_FN(4) TILE_FN(5) TILE_FN(6)
typedef void (*tile_fn)(const float *, long, const float *, float *, long, long);
static const tile_fn TILES[MR + 1] = {NULL, tile1, tile2, tile3, tile4, tile5, tile6};

/* One group: y[M, 0:N] (row stride ldy) = x[M, K] @ W (N / 16 packed panels). Rows go in
 * blocks whose x slice fits in L2 (~256 KB), panels are the outer loop inside a block so a
 * panel (K * 64 bytes) stays in L1/L2 while every row tile of the block reads it. */
static void group_gemm(const float *x, const float *w, float *y, long M, long K, long N,
                       long ldy)
{
    long mc = (256 * 1024) / (K * (long)sizeof(float));
    mc = mc < MR ? MR : mc / MR * MR;
    for (long m0 = 0; m0 < M; m0 += mc) {
        const long m1 = M < m0 + mc ? M : m0 + mc;
        for (long p = 0; p < N / NR; p++) {
            const float *panel = w + p * K * NR;
            for (long r = m0; r < m1; r += MR) {
                const long mr = m1 - r < MR ? m1 - r : MR;
                TILES[mr](x + r * K, K, panel, y + r * ldy + p * NR, ldy, K);
            }
        }
    }
}

/* grouped_gemm(x_ptr, rows, w_ptr, y_ptr, offs_ptr, groups, K, N, n0, n1) -> None
 * Columns [n0, n1) of every group's output (multiples of 16): callers split a call over
 * threads by columns, so each thread streams its share of every group's weight whatever the
 * groups' row counts. Pointers are data_ptr() values of tensors the caller keeps alive (see
 * the header comment for shapes). Raises ValueError for bad offsets or sizes, RuntimeError
 * without AVX2/FMA. A dense layer is one group (offs = [rows]). */
static PyObject *grouped_gemm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long v[10];
    if (!parse_longs(args, nargs, 10, 10, v, "grouped_gemm")) return NULL;
    const float *x = (const float *)(intptr_t)v[0], *w = (const float *)(intptr_t)v[2];
    float *y = (float *)(intptr_t)v[3];
    const int32_t *offs = (const int32_t *)(intptr_t)v[4];
    const long M = v[1], G = v[5], K = v[6], N = v[7], n0 = v[8], n1 = v[9];
    if (M < 0 || G < 0 || K < 1 || N < NR || N % NR || n0 < 0 || n0 % NR || n1 <= n0 ||
        n1 > N || n1 % NR) {
        PyErr_Format(PyExc_ValueError, "grouped_gemm: bad sizes rows=%ld groups=%ld K=%ld N=%ld "
                     "columns [%ld, %ld) (N and the column bounds must be multiples of %d)",
                     M, G, K, N, n0, n1, NR);
        return NULL;
    }
    long prev = 0;
    for (long g = 0; g < G; g++) {
        if (offs[g] < prev || offs[g] > M) {
            PyErr_Format(PyExc_ValueError, "grouped_gemm: offset %ld of group %ld is outside "
                         "[%ld, %ld]", (long)offs[g], g, prev, M);
            return NULL;
        }
        prev = offs[g];
    }
    Py_BEGIN_ALLOW_THREADS
    long start = 0;
    for (long g = 0; g < G; g++) {
        const long end = offs[g];
        if (end > start)  /* panel p of group g lies at w + g * K * N + p * K * 16 */
            group_gemm(x + start * K, w + g * K * N + n0 * K, y + start * N + n0, end - start, K,
                       n1 - n0, N);
        start = end;
    }
    for (long r = start; r < M; r++) memset(y + r * N + n0, 0, (size_t)(n1 - n0) * sizeof(float));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"grouped_gemm", (PyCFunction)(void (*)(void))grouped_gemm, METH_FASTCALL,
     "grouped_gemm(x_ptr, rows, w_ptr, y_ptr, offs_ptr, groups, K, N, n0, n1) -> None"},
    {"supported", supported, METH_NOARGS, "supported() -> whether this CPU has AVX2 and FMA"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_gemm",
                                    "Grouped float32 GEMM over pre-packed weights (AVX2+FMA).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__cpu_gemm(void)
{
    return create_module(&module, API_VERSION);
}
