"""CPU matmul kernels for weight-only int8 / int4 Linears, chosen by measurement.

Why a small C kernel: on this project's reference CPU (2-core AMD EPYC, AVX-512, torch 2.13) the
stock paths were measured slower than fp32 at batch 1 (``bench-quant`` repeats the measurement and
records it under ``kernels``): ``torch._weight_int8pack_mm`` ~2-3x slower than fp32 ``F.linear``,
``aten._weight_int4pack_mm_for_cpu`` ~4-9x slower, ``torch.compile`` of dequant+matmul did not fuse
the dequantization into the reduction, and plain dequant+matmul reads the weight twice. Decoding at
batch 1 is a memory-bound matrix-vector product, so the kernel only has to stream the packed bytes
once and keep the FMA units fed: it widens int8/int4 codes to fp32 in registers and accumulates with
AVX-512 FMA (a portable C loop elsewhere), parallel over output rows with OpenMP (torch's own libgomp,
already loaded, so both share one thread pool).

The library is compiled once per machine with the system C compiler into
``$VERTICALS_HOME/cache/quant/`` and loaded with ctypes. No compiler / failed build -> the dequant +
``F.linear`` path, with a warning. Many-row inputs (prefill, perplexity) take dequant + BLAS, which
is compute-bound and faster there; ``ROW_THRESHOLD`` is where the kernel stops paying off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from core.quant.formats import dequantize_int4, dequantize_int8

log = logging.getLogger(__name__)

Backend = Literal["c", "dequant"]
ROW_THRESHOLD = 32  # rows of x up to which the C kernel is used; above it dequant + BLAS

_C_SOURCE = r"""
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <omp.h>

static inline float h2f(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023, o;
  if (e == 0) { if (!m) o = s << 31; else { e = 127 - 15 + 1; while (!(m & 1024)) { m <<= 1; e--; }
      o = (s << 31) | (e << 23) | ((m & 1023) << 13); } }
  else if (e == 31) o = (s << 31) | 0x7f800000u | (m << 13);
  else o = (s << 31) | ((e + 112) << 23) | (m << 13);
  float f; __builtin_memcpy(&f, &o, 4); return f;
#endif
}

/* fp32 batch-1 matvec y[n] = sum_k x[k] * w[n, k] (+ bias[n]): the core LM's decode step. MKL's
   sgemm at M=1 streams a 512x512 weight at ~8 GB/s on the reference CPU; this loop reaches ~15 GB/s. */
void f32_mv(const float* x, const float* w, const float* bias, float* y, int N, int K, int nth) {
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int n = 0; n < N; n++) {
    const float* wr = w + (int64_t)n * K;
    float o;
    int k = 0;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(wr + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(wr + k + 16), a1);
    }
    o = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    o = 0.f;
#endif
    for (; k < K; k++) o += x[k] * wr[k];
    y[n] = o + (bias ? bias[n] : 0.f);
  }
}

/* A few fp32 rows (speculative verification, small engine batches): each weight row is read once
   for all M rows of x. y (M, N). */
void f32_mm(const float* x, const float* w, const float* bias, float* y, int M, int N, int K, int nth) {
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int n = 0; n < N; n++) {
    const float* wr = w + (int64_t)n * K;
    for (int m0 = 0; m0 < M; m0 += 4) {
      int mb = M - m0 < 4 ? M - m0 : 4;
      float out[4];
      int k = 0;
#ifdef __AVX512F__
      __m512 acc[4];
      for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) {
        __m512 wv = _mm512_loadu_ps(wr + k);
        for (int i = 0; i < mb; i++)
          acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)(m0 + i) * K + k), wv, acc[i]);
      }
      for (int i = 0; i < mb; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
#else
      for (int i = 0; i < mb; i++) out[i] = 0.f;
#endif
      for (int i = 0; i < mb; i++) {
        const float* xr = x + (int64_t)(m0 + i) * K;
        for (int kk = k; kk < K; kk++) out[i] += xr[kk] * wr[kk];
        y[(int64_t)(m0 + i) * N + n] = out[i] + (bias ? bias[n] : 0.f);
      }
    }
  }
}

#define MB 4
/* y[m, n] = s[n] * sum_k x[m, k] * w[n, k] (+ bias[n]);  x (M, K) fp32, w (N, K) int8 */
void w8_mm(const float* x, const int8_t* w, const float* s, const float* bias, float* y,
           int M, int N, int K, int nth) {
  #pragma omp parallel for num_threads(nth) schedule(dynamic, 16)
  for (int n = 0; n < N; n++) {
    const int8_t* wr = w + (int64_t)n * K;
    for (int m0 = 0; m0 < M; m0 += MB) {
      int mb = M - m0 < MB ? M - m0 : MB;
      float out[MB];
#ifdef __AVX512F__
      __m512 acc[MB];
      for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
      int k = 0;
      for (; k + 16 <= K; k += 16) {
        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k))));
        for (int i = 0; i < mb; i++)
          acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)(m0 + i) * K + k), wv, acc[i]);
      }
      for (int i = 0; i < mb; i++) {
        out[i] = _mm512_reduce_add_ps(acc[i]);
        for (int kk = k; kk < K; kk++) out[i] += x[(int64_t)(m0 + i) * K + kk] * (float)wr[kk];
      }
#else
      for (int i = 0; i < mb; i++) {
        const float* xr = x + (int64_t)(m0 + i) * K;
        float a = 0.f;
        for (int k = 0; k < K; k++) a += xr[k] * (float)wr[k];
        out[i] = a;
      }
#endif
      for (int i = 0; i < mb; i++) y[(int64_t)(m0 + i) * N + n] = out[i] * s[n] + (bias ? bias[n] : 0.f);
    }
  }
}

/* int4: packed (N, K/2); byte j of group g holds code j (low) and j + G/2 (high);
   w = code * sc + mn with sc, mn fp16 (N, K/G);  xs (M, K/G) = per-group sums of x. */
void w4_mm(const float* x, const float* xs, const uint8_t* w, const uint16_t* sc, const uint16_t* mn,
           const float* bias, float* y, int M, int N, int K, int G, int nth) {
  int ng = K / G, h = G / 2;
  #pragma omp parallel for num_threads(nth) schedule(dynamic, 16)
  for (int n = 0; n < N; n++) {
    const uint8_t* wr = w + (int64_t)n * (K / 2);
    const uint16_t* scr = sc + (int64_t)n * ng;
    const uint16_t* mnr = mn + (int64_t)n * ng;
    for (int m0 = 0; m0 < M; m0 += MB) {
      int mb = M - m0 < MB ? M - m0 : MB;
      float tot[MB];
      for (int i = 0; i < MB; i++) tot[i] = 0.f;
#ifdef __AVX512F__
      __m512 tv[MB];  /* scaled group sums stay in registers: one horizontal add per row, not per group */
      for (int i = 0; i < MB; i++) tv[i] = _mm512_setzero_ps();
#endif
      for (int g = 0; g < ng; g++) {
        const uint8_t* p = wr + g * h;
        float s = h2f(scr[g]);
#ifdef __AVX512F__
        const __m512i mask = _mm512_set1_epi32(15);
        __m512 acc[MB];
        for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
        for (int j = 0; j < h; j += 16) {
          __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + j)));
          __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
          __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
          for (int i = 0; i < mb; i++) {
            const float* xg = x + (int64_t)(m0 + i) * K + g * G;
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + j), lo, acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + j + h), hi, acc[i]);
          }
        }
        const __m512 sv = _mm512_set1_ps(s);
        for (int i = 0; i < mb; i++) tv[i] = _mm512_fmadd_ps(acc[i], sv, tv[i]);
#else
        for (int i = 0; i < mb; i++) {
          const float* xg = x + (int64_t)(m0 + i) * K + g * G;
          float a = 0.f;
          for (int j = 0; j < h; j++) a += xg[j] * (float)(p[j] & 15) + xg[j + h] * (float)(p[j] >> 4);
          tot[i] += a * s;
        }
#endif
      }
#ifdef __AVX512F__
      for (int i = 0; i < mb; i++) tot[i] = _mm512_reduce_add_ps(tv[i]);
#endif
      for (int i = 0; i < mb; i++) {
        const float* xsr = xs + (int64_t)(m0 + i) * ng;
        float t = tot[i];
        for (int g = 0; g < ng; g++) t += xsr[g] * h2f(mnr[g]);
        y[(int64_t)(m0 + i) * N + n] = t + (bias ? bias[n] : 0.f);
      }
    }
  }
}
"""

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()
_backend_override: Backend | None = None
_threads: int | None = None  # set_threads() override
_configured_threads: int | None = None  # VERTICALS_QUANT_THREADS (Settings.quant_threads), read once


def _cache_dir() -> Path:
    from core.settings import get_settings

    return get_settings().home / "cache" / "quant"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    key = hashlib.sha256((_C_SOURCE + _cpu_flags() + cc).encode()).hexdigest()[:16]
    out = _cache_dir() / f"qkernels_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(f".{os.getpid()}.c")
        tmp = out.with_suffix(f".{os.getpid()}.so.tmp")
        src.write_text(_C_SOURCE)
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        src.unlink(missing_ok=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the quant kernels failed: {r.stderr.strip()[:500]}")
        tmp.replace(out)
    lib = ctypes.CDLL(str(out))
    P, Ci = ctypes.c_void_p, ctypes.c_int
    lib.w8_mm.argtypes = [P, P, P, P, P, Ci, Ci, Ci, Ci]
    lib.w8_mm.restype = None
    lib.w4_mm.argtypes = [P, P, P, P, P, P, P, Ci, Ci, Ci, Ci, Ci]
    lib.w4_mm.restype = None
    lib.f32_mv.argtypes = [P, P, P, P, Ci, Ci, Ci]
    lib.f32_mv.restype = None
    lib.f32_mm.argtypes = [P, P, P, P, Ci, Ci, Ci, Ci]
    lib.f32_mm.restype = None
    return lib


def c_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with the reason in :func:`c_library_error`)."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        with _lock:
            if _lib is None and _lib_error is None:
                try:
                    _lib = _build()
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    _lib_error = str(e)
                    log.warning("quant C kernels unavailable, using dequant+matmul: %s", e)
    return _lib


def c_library_error() -> str | None:
    c_library()
    return _lib_error


def set_backend(backend: Backend | None) -> None:
    """Force a backend for every quantized Linear (None = automatic: C kernel when built)."""
    global _backend_override
    _backend_override = backend


def set_threads(n: int | None) -> None:
    """Threads the C kernel uses (None = torch.get_num_threads()). On a CPU shared with other busy
    processes one thread can beat two: an OpenMP team waits at its barrier for a descheduled thread."""
    global _threads
    _threads = n


def kernel_threads() -> int:
    global _configured_threads
    if _threads:
        return _threads
    if _configured_threads is None:
        from core.settings import get_settings

        _configured_threads = max(0, get_settings().quant_threads)
    return _configured_threads or torch.get_num_threads()


def active_backend() -> Backend:
    if _backend_override is not None:
        return _backend_override
    return "c" if c_library() is not None else "dequant"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                backend: Backend | None = None) -> torch.Tensor:
    """x (..., K) fp32, q int8 (N, K), scale fp32 (N,) -> (..., N)."""
    K = x.shape[-1]
    N = q.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    be = backend or active_backend()
    if be == "c" and M <= ROW_THRESHOLD and x.dtype == torch.float32 and not x.requires_grad:
        lib = c_library()
        if lib is not None:
            x2 = x2.contiguous()
            y = torch.empty(M, N, dtype=torch.float32)
            lib.w8_mm(x2.data_ptr(), q.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(),
                      M, N, K, kernel_threads())
            return y.view(*x.shape[:-1], N)
    return F.linear(x, dequantize_int8(q, scale).to(x.dtype), bias)


F32_MAX_ROWS = 4  # rows of x up to which f32_matvec takes the C kernel


def f32_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., K) with at most ``F32_MAX_ROWS`` rows times W (N, K)^T (+ b) in fp32 with the C kernel,
    or None when the kernel cannot take it (no library, more rows, wrong dtype/device/layout, autograd
    needed): then use F.linear. Used by the core LM for batch-1 decode and 2-token speculative
    verification, where F.linear (MKL sgemm at M=1) is ~2x slower."""
    K = weight.shape[-1]
    if (x.shape[-1] != K or x.numel() > F32_MAX_ROWS * K or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or not weight.is_contiguous() or x.requires_grad
            or (weight.requires_grad and torch.is_grad_enabled())
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))
            or _backend_override == "dequant"):
        return None
    lib = _lib if _lib is not None else c_library()
    if lib is None:
        return None
    N = weight.shape[0]
    M = x.numel() // K
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    if M == 1:
        lib.f32_mv(x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), N, K, kernel_threads())
    elif M > 1:
        lib.f32_mm(x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K, kernel_threads())
    return y


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None,
                backend: Backend | None = None) -> torch.Tensor:
    """x (..., K) fp32, packed uint8 (N, K/2), scale/minv fp16 or fp32 (N, K/G) -> (..., N)."""
    K = x.shape[-1]
    N = packed.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    be = backend or active_backend()
    if (be == "c" and M <= ROW_THRESHOLD and x.dtype == torch.float32 and not x.requires_grad
            and scale.dtype == torch.float16):
        lib = c_library()
        if lib is not None:
            x2 = x2.contiguous()
            xs = x2.view(M, K // group_size, group_size).sum(-1).contiguous()  # (M, K/G)
            y = torch.empty(M, N, dtype=torch.float32)
            lib.w4_mm(x2.data_ptr(), xs.data_ptr(), packed.data_ptr(), scale.data_ptr(), minv.data_ptr(),
                      _ptr(bias), y.data_ptr(), M, N, K, group_size, kernel_threads())
            return y.view(*x.shape[:-1], N)
    w = dequantize_int4(packed, scale, minv, group_size).to(x.dtype)
    return F.linear(x, w, bias)


# ---------------------------------------------------------------------------------------------------
# Measurement: which path is fastest for a decode-shaped matmul on this machine
# ---------------------------------------------------------------------------------------------------
def _median_time(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Round-robin timing (the machine is shared: interleaving keeps the comparison fair)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # type: ignore[operator]
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()  # type: ignore[operator]
            times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}


@torch.no_grad()
def microbench(N: int = 2048, K: int = 2048, rows: int = 1, group_size: int = 64,
               reps: int = 20) -> dict[str, float]:
    """Microseconds per call of every candidate path for y = x W^T, x (rows, K), W (N, K)."""
    from core.quant.formats import quantize_int4, quantize_int8, unpack_int4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(rows, K, generator=g)
    q8, s8 = quantize_int8(w)
    p4, sc, mn = quantize_int4(w, group_size, clip_search=False)
    fns: dict[str, object] = {
        "fp32_linear": lambda: F.linear(x, w),
        "int8_dequant_matmul": lambda: int8_linear(x, q8, s8, backend="dequant"),
        "int4_dequant_matmul": lambda: int4_linear(x, p4, sc, mn, group_size, backend="dequant"),
    }
    if c_library() is not None:
        fns["int8_c_kernel"] = lambda: int8_linear(x, q8, s8, backend="c")
        fns["int4_c_kernel"] = lambda: int4_linear(x, p4, sc, mn, group_size, backend="c")
    try:
        torch._weight_int8pack_mm(x, q8, s8)
        fns["int8_torch_weight_int8pack_mm"] = lambda: torch._weight_int8pack_mm(x, q8, s8)
    except (RuntimeError, AttributeError) as e:
        log.info("torch._weight_int8pack_mm unavailable: %s", e)
    try:
        codes = unpack_int4(p4, group_size).to(torch.int32)
        wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # torch's format: w = (code - 8) * scale + zero  ->  zero = minv + 8 * scale; (K/G, N, 2)
        sz = torch.stack([sc.float().T, (mn.float() + 8 * sc.float()).T], -1).contiguous()
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, wp, group_size, sz)
        fns["int4_torch_weight_int4pack_mm_for_cpu"] = (
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, wp, group_size, sz))
    except (RuntimeError, AttributeError) as e:
        log.info("torch int4pack CPU kernel unavailable: %s", e)
    return _median_time(fns, reps)
