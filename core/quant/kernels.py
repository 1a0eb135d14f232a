"""CPU matmul kernels for weight-only int8 / int4 Linears, chosen by measurement.

Why a small C kernel: on this project's CPUs (2-core AMD EPYC VMs; AVX-512 on some, AVX2 + FMA + F16C only
on others) the stock paths were measured slower than fp32 at batch 1 (``bench-quant`` repeats the
measurement and records it under ``kernels``): ``torch._weight_int8pack_mm`` ~2-3x slower than fp32
``F.linear``, ``aten._weight_int4pack_mm_for_cpu`` ~4-9x slower, ``torch.compile`` of dequant+matmul did
not fuse the dequantization into the reduction, and plain dequant+matmul reads the weight twice.

Decode (batch 1, up to ``ROW_THRESHOLD`` rows) takes the **integer-dot kernels** by default, the
llama.cpp Q4 x Q8 scheme: each activation row is quantized once per call to int8 in blocks (the int4
group size; 64 or 32 for int8 weights), then each block's dot product with the weight codes is an exact
int32 sum (AVX2 ``maddubs``/``madd``: int4 nibbles unpacked with and/shift, int8 signs moved onto the
activation with ``sign``), scaled once per block by activation scale x weight scale; 4 (int8) or 2
(int4) output rows per step share the activation loads. Widening every weight to fp32 and FMA-ing (the
**float-activation kernels**, still here: ``set_activation_quant(False)``, and the path for widths that
are not a multiple of 32) was compute-bound for int4: 2048x2048 at 1 thread, fp32 matvec ~870 us,
float-activation int4 ~700 us, integer-dot int4 ~130-200 us (``microbench`` measures all of them side
by side). Activation quantization costs ~0.5% relative error per layer; ``bench-quant`` reports the
perplexity through these kernels as ``ppl_int8_act``.

On CPUs with AVX-512 VNNI the integer-dot kernels use ``vpdpbusd`` on 64-byte vectors instead (int8:
weight codes flipped to unsigned with one xor, the offset paid back from the activation block sums;
int4 group 64: two groups per load on a pair-interleaved copy of the activation row), 1.3-1.6x faster
per call than the AVX2 code on the same CPU with a cache-resident weight (in DRAM-bound decode: int4
+5-8%, int8 no gain); all of them prefetch the weight stream into L2 8 KiB ahead
(decode weights come from DRAM: ~2x the streaming rate). ``bind_gate_up`` runs a gated MLP's gate and
up projections as one call (``core.quant.fused``).

The same library holds ``f32_mv`` / ``f32_mm``, the core LM's batch-1 fp32 Linear (``f32_matvec``).
Every kernel has AVX-512 or AVX2 code (picked at compile time) and a portable C loop elsewhere;
OpenMP over output rows (torch's own libgomp, already loaded, so both share one thread pool).

The library is compiled once per machine with the system C compiler (``-O3 -march=native``) into
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from core.quant.formats import dequantize_int4, dequantize_int8

log = logging.getLogger(__name__)

Backend = Literal["c", "dequant"]
ROW_THRESHOLD = 32  # rows of x up to which the C kernel is used; above it dequant + BLAS

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define USE_AVX2 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define INT_DOT_AVX2 1  /* integer-dot kernels: AVX2 maddubs/madd (also on AVX-512 CPUs without VNNI) */
#endif
#if defined(INT_DOT_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) \
    && defined(__AVX512VNNI__)
#define INT_DOT_VNNI 1  /* integer-dot kernels: AVX-512 VNNI vpdpbusd, 64 bytes per instruction */
#endif
#include <string.h>

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

#if defined(__AVX2__)
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/* fp32 weight stream prefetch into L2, F32_PF_DIST bytes ahead (one call per 64-byte line). Decode
   reads each weight once from DRAM; a 4 KiB lead measured 4.4-5.7% faster decode of the 68.9M bench
   LM than none in three side-by-side runs on the 2-core AVX-512 VM (2 KiB slower, 8 KiB no gain). */
#ifndef F32_PF_DIST
#define F32_PF_DIST 4096
#endif
#define F32_PF(p) _mm_prefetch((const char*)(p) + F32_PF_DIST, _MM_HINT_T1)

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
      F32_PF(wr + k); F32_PF(wr + k + 16);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(wr + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(wr + k + 16), a1);
    }
    o = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(USE_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      F32_PF(wr + k); F32_PF(wr + k + 16);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(wr + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(wr + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(wr + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_loadu_ps(wr + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(wr + k), a0);
    o = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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
        if (m0 == 0) F32_PF(wr + k);
        __m512 wv = _mm512_loadu_ps(wr + k);
        for (int i = 0; i < mb; i++)
          acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)(m0 + i) * K + k), wv, acc[i]);
      }
      for (int i = 0; i < mb; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
#elif defined(USE_AVX2)
      __m256 acc[4];
      for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        if (m0 == 0 && !(k & 15)) F32_PF(wr + k);
        __m256 wv = _mm256_loadu_ps(wr + k);
        for (int i = 0; i < mb; i++)
          acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)(m0 + i) * K + k), wv, acc[i]);
      }
      for (int i = 0; i < mb; i++) out[i] = hsum8(acc[i]);
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
/* Float-activation int8: y[m, n] = s[n] * sum_k x[m, k] * w[n, k] (+ bias[n]);  x (M, K) fp32, w (N, K) int8 */
void w8_mm(const float* x, const int8_t* w, const float* s, const float* bias, float* y,
           int M, int N, int K, int nth) {
  #pragma omp parallel for num_threads(nth) schedule(dynamic, 16)
  for (int n = 0; n < N; n++) {
    const int8_t* wr = w + (int64_t)n * K;
    for (int m0 = 0; m0 < M; m0 += MB) {
      int mb = M - m0 < MB ? M - m0 : MB;
      float out[MB];
      int k = 0;
#ifdef __AVX512F__
      __m512 acc[MB];
      for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) {
        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k))));
        for (int i = 0; i < mb; i++)
          acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)(m0 + i) * K + k), wv, acc[i]);
      }
      for (int i = 0; i < mb; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
#elif defined(USE_AVX2)
      __m256 acc[MB];
      for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wr + k))));
        for (int i = 0; i < mb; i++)
          acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)(m0 + i) * K + k), wv, acc[i]);
      }
      for (int i = 0; i < mb; i++) out[i] = hsum8(acc[i]);
#else
      for (int i = 0; i < mb; i++) out[i] = 0.f;
#endif
      for (int i = 0; i < mb; i++) {
        const float* xr = x + (int64_t)(m0 + i) * K;
        for (int kk = k; kk < K; kk++) out[i] += xr[kk] * (float)wr[kk];
        y[(int64_t)(m0 + i) * N + n] = out[i] * s[n] + (bias ? bias[n] : 0.f);
      }
    }
  }
}

/* Float-activation int4: packed (N, K/2); byte j of group g holds code j (low) and j + G/2 (high);
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
#elif defined(USE_AVX2)
      __m256 tv[MB];
      for (int i = 0; i < MB; i++) tv[i] = _mm256_setzero_ps();
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
#elif defined(USE_AVX2)
        const __m256i mask = _mm256_set1_epi32(15);
        __m256 acc[MB];
        for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
        for (int j = 0; j < h; j += 8) {
          __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + j)));
          __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
          __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
          for (int i = 0; i < mb; i++) {
            const float* xg = x + (int64_t)(m0 + i) * K + g * G;
            acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + j), lo, acc[i]);
            acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + j + h), hi, acc[i]);
          }
        }
        const __m256 sv = _mm256_set1_ps(s);
        for (int i = 0; i < mb; i++) tv[i] = _mm256_fmadd_ps(acc[i], sv, tv[i]);
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
#elif defined(USE_AVX2)
      for (int i = 0; i < mb; i++) tot[i] = hsum8(tv[i]);
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

/* ---- integer-dot kernels (llama.cpp Q4 x Q8 style) -------------------------------------------------
   The activation rows are quantized once per call to int8 in blocks of B (B = the int4 group size, or
   32/64 for int8 weights): xq = round(x / d), d = absmax(block) / 127, so |xq| <= 127. A block's dot
   product with the weight codes is then an exact int32 sum (AVX2 maddubs + madd), scaled once by
   d (x) the weight scale. For int4 w = code * sc + mn:  sum_k x w = sum_g d_g (sc_g isum(code xq) +
   mn_g isum(xq)), so the second term needs only the per-block sums of xq (xs = d * isum(xq)). */

/* x (M, K) -> xq (M, K) int8, d (M, K/B), xs (M, K/B) = d * sum(xq). B a multiple of 32. */
void q8_rows(const float* x, int8_t* xq, float* d, float* xs, int M, int K, int B) {
  int nb = K / B;
  for (int m = 0; m < M; m++) {
    for (int b = 0; b < nb; b++) {
      const float* xb = x + (int64_t)m * K + (int64_t)b * B;
      int8_t* qb = xq + (int64_t)m * K + (int64_t)b * B;
      float amax = 0.f;
      for (int i = 0; i < B; i++) { float a = fabsf(xb[i]); amax = a > amax ? a : amax; }
      float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      int sum = 0;
#ifdef INT_DOT_AVX2
      const __m256 vid = _mm256_set1_ps(id);
      const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      __m256i vs = _mm256_setzero_si256();
      for (int i = 0; i < B; i += 32) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vid));
        __m256i b1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), vid));
        __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), vid));
        __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), vid));
        vs = _mm256_add_epi32(vs, _mm256_add_epi32(_mm256_add_epi32(a, b1), _mm256_add_epi32(c, e)));
        __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(a, b1), _mm256_packs_epi32(c, e));
        _mm256_storeu_si256((__m256i*)(qb + i), _mm256_permutevar8x32_epi32(q, perm));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vs), _mm256_extracti128_si256(vs, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
      sum = _mm_cvtsi128_si32(s4);
#else
      for (int i = 0; i < B; i++) { int q = (int)nearbyintf(xb[i] * id); qb[i] = (int8_t)q; sum += q; }
#endif
      d[(int64_t)m * nb + b] = dd;
      xs[(int64_t)m * nb + b] = dd * (float)sum;
    }
  }
}

/* scratch for the quantized activation, one per calling thread (grown, never shrunk) */
static __thread int8_t* tl_xq = 0;
static __thread float* tl_d = 0;
static __thread int64_t tl_cap = 0;
static int scratch(int64_t n) {
  if (n <= tl_cap) return 0;
  free(tl_xq); free(tl_d);
  tl_xq = (int8_t*)malloc(2 * n + 128);  /* xq, then (VNNI int4, G = 64) xq with group pairs interleaved */
  tl_d = (float*)malloc(sizeof(float) * (2 * (n / 32) + 16));
  if (!tl_xq || !tl_d) { free(tl_xq); free(tl_d); tl_xq = 0; tl_d = 0; tl_cap = 0; return -1; }
  tl_cap = n;
  return 0;
}

/* A call's quantized activation rows, in the thread's scratch: xq (M, K) int8, d / xs (M, K/B) block
   scales / block sums (q8_rows); xp: the int4 VNNI kernel's group-pair interleaved copy, else 0. */
typedef struct { const int8_t* xq; const int8_t* xp; const float* d; const float* xs; } qact;
static int q8_prep(const float* x, int M, int K, int B, qact* a) {
  if (scratch((int64_t)M * K)) return -1;
  float* xs = tl_d + (int64_t)M * (K / B) + 8;
  q8_rows(x, tl_xq, tl_d, xs, M, K, B);
  a->xq = tl_xq; a->d = tl_d; a->xs = xs; a->xp = 0;
  return 0;
}

#define NR 4  /* output rows per step: the activation loads are shared by NR weight rows */
/* Software prefetch into L2, PF_DIST bytes ahead in the weight stream. Decode weights come from DRAM
   and a tile of NR short rows is several short streams that the hardware prefetcher does not keep
   far enough ahead: on the 2-core AVX-512 VM, weights streamed through the integer-dot kernels at
   ~8 GB/s without it and ~19 GB/s with it (T1, 8 KiB ahead; into L1 (T0) or 2-4 KiB ahead: ~9-12). */
#ifndef PF_DIST
#define PF_DIST 8192
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#define PF(p) _mm_prefetch((const char*)(p) + PF_DIST, PF_HINT)
#if !defined(NR4) && defined(INT_DOT_VNNI) && defined(NR4_VNNI)
#define NR4 NR4_VNNI
#endif
#ifndef NR4
#define NR4 2  /* int4: 2 rows measured faster than 4 (register pressure: 2 unpacked halves per row) */
#endif

/* R rows of int8 weights (w8: row stride K) times one quantized activation row. out[r] unscaled by s. */
static inline __attribute__((always_inline)) void w8q_rows(const int8_t* xr, const float* dr, const float* xsr,
                                                          const int8_t* w, int K, int B, int R, float* out) {
  int nb = K / B;
#ifdef INT_DOT_VNNI
  /* vpdpbusd multiplies unsigned by signed bytes: the weight codes become unsigned (w + 128: one xor)
     and the activation side pays it back once per row: sum_b d_b isum_b((w + 128) xq) =
     sum_b d_b isum_b(w xq) + 128 sum_b xs_b (xs_b = d_b isum_b(xq)). */
  if (B % 64 == 0) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[NR];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
      __m512i is[NR];
      for (int r = 0; r < R; r++) is[r] = _mm512_setzero_si512();
      for (int j = 0; j < B; j += 64) {
        __m512i xv = _mm512_loadu_si512((const void*)(xr + b * B + j));
        for (int r = 0; r < R; r++) {
          const int8_t* wp = w + (int64_t)r * K + b * B + j;
          PF(wp);
          is[r] = _mm512_dpbusd_epi32(is[r], _mm512_xor_si512(_mm512_loadu_si512((const void*)wp), flip), xv);
        }
      }
      const __m512 dv = _mm512_set1_ps(dr[b]);
      for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), dv, acc[r]);
    }
    float xt = 0.f;
    for (int b = 0; b < nb; b++) xt += xsr[b];
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]) - 128.f * xt;
    return;
  }
#endif
#ifdef INT_DOT_AVX2
  const __m256i one16 = _mm256_set1_epi16(1);
  __m256 acc[NR];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int b = 0; b < nb; b++) {
    __m256i is[NR];
    for (int r = 0; r < R; r++) is[r] = _mm256_setzero_si256();
    for (int j = 0; j < B; j += 32) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xr + b * B + j));
      for (int r = 0; r < R; r++) {
        if (!(j & 63)) PF(w + (int64_t)r * K + b * B + j);
        __m256i wv = _mm256_loadu_si256((const __m256i*)(w + (int64_t)r * K + b * B + j));
        __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(p, one16));
      }
    }
    const __m256 dv = _mm256_set1_ps(dr[b]);
    for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r]), dv, acc[r]);
  }
  for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]);
#else
  for (int r = 0; r < R; r++) {
    const int8_t* wr = w + (int64_t)r * K;
    float a = 0.f;
    for (int b = 0; b < nb; b++) {
      int s = 0;
      for (int j = 0; j < B; j++) s += (int)xr[b * B + j] * (int)wr[b * B + j];
      a += dr[b] * (float)s;
    }
    out[r] = a;
  }
#endif
}

/* y[m, n] = s[n] * sum_b d[m, b] isum_b(xq[m] w[n]) (+ bias[n]); x (M, K) fp32, w (N, K) int8; K % B == 0 */
int w8q_mm(const float* x, const int8_t* w, const float* s, const float* bias, float* y,
           int M, int N, int K, int B, int nth) {
  qact a;
  if (q8_prep(x, M, K, B, &a)) return -1;
  const int8_t* xq = a.xq;
  const float *d = a.d, *xs = a.xs;
  int nb = K / B, nq = (N + NR - 1) / NR;
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int t = 0; t < nq; t++) {
    int n0 = t * NR, nr = N - n0 < NR ? N - n0 : NR;
    const int8_t* wq = w + (int64_t)n0 * K;
    for (int m = 0; m < M; m++) {
      float out[NR];
      const int8_t* xr = xq + (int64_t)m * K;
      const float *dr = d + (int64_t)m * nb, *xsr = xs + (int64_t)m * nb;
      if (nr == NR) w8q_rows(xr, dr, xsr, wq, K, B, NR, out);
      else for (int r = 0; r < nr; r++) w8q_rows(xr, dr, xsr, wq + (int64_t)r * K, K, B, 1, out + r);
      for (int r = 0; r < nr; r++)
        y[(int64_t)m * N + n0 + r] = out[r] * s[n0 + r] + (bias ? bias[n0 + r] : 0.f);
    }
  }
  return 0;
}

/* The int8 gated-MLP first half: y = silu(x Wg^T * sg + bg) * (x Wu^T * su + bu), one activation quantization */
int w8q_gu_mm(const float* x, const int8_t* wg, const float* sg, const float* bg, const int8_t* wu, const float* su,
              const float* bu, float* y, int M, int N, int K, int B, int nth) {
  qact a;
  if (q8_prep(x, M, K, B, &a)) return -1;
  const int8_t* xq = a.xq;
  const float *d = a.d, *xs = a.xs;
  int nb = K / B, nq = (N + NR - 1) / NR;
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int t = 0; t < nq; t++) {
    int n0 = t * NR, nr = N - n0 < NR ? N - n0 : NR;
    for (int m = 0; m < M; m++) {
      float og[NR], ou[NR];
      const int8_t* xr = xq + (int64_t)m * K;
      const float *dr = d + (int64_t)m * nb, *xsr = xs + (int64_t)m * nb;
      if (nr == NR) {
        w8q_rows(xr, dr, xsr, wg + (int64_t)n0 * K, K, B, NR, og);
        w8q_rows(xr, dr, xsr, wu + (int64_t)n0 * K, K, B, NR, ou);
      } else for (int r = 0; r < nr; r++) {
        w8q_rows(xr, dr, xsr, wg + (int64_t)(n0 + r) * K, K, B, 1, og + r);
        w8q_rows(xr, dr, xsr, wu + (int64_t)(n0 + r) * K, K, B, 1, ou + r);
      }
      for (int r = 0; r < nr; r++) {
        float g = og[r] * sg[n0 + r] + (bg ? bg[n0 + r] : 0.f), u = ou[r] * su[n0 + r] + (bu ? bu[n0 + r] : 0.f);
        y[(int64_t)m * N + n0 + r] = g / (1.f + expf(-g)) * u;
      }
    }
  }
  return 0;
}

/* R rows of packed int4 (row stride K/2 bytes, ng = K/G groups) times one quantized activation row. */
static inline __attribute__((always_inline)) void w4q_rows(const int8_t* xr, const int8_t* xp, const float* dr,
                                                          const float* xsr, const uint8_t* w, const uint16_t* sc,
                                                          const uint16_t* mn, int K, int G, int R, float* out) {
  int ng = K / G, h = G / 2;
  int64_t rb = K / 2;
  float tail[NR4];
  for (int r = 0; r < R; r++) tail[r] = 0.f;
  int done = 0;
  (void)done;
#ifdef INT_DOT_VNNI
  /* AVX-512 VNNI: vpdpbusd (unsigned codes x signed activations, 4 products summed per int32 lane) on
     64 packed bytes = 128 codes at a time. G = 64: a 64-byte load holds two groups (low nibbles: codes
     0-31 of both, high: 32-63), so the activation row comes pre-interleaved per group pair (``xp``:
     [g lo | g+1 lo | g hi | g+1 hi]) and lanes 0-7 / 8-15 take group g's / g+1's scale. G % 128 == 0:
     one group spans whole 64-byte steps. */
  if (G == 64 && xp) {
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i pidx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[NR4];
    float scd[NR4][64];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g + 2 <= ng; g += 2) {
      if ((g & 63) == 0) {
        int gn = ng - g < 64 ? ng - g : 64;
        for (int i = 0; i < gn; i += 16) {  /* masked loads for the last < 16 groups */
          __mmask16 k = gn - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (gn - i)) - 1);
          __m512 dv = _mm512_maskz_loadu_ps(k, dr + g + i);
          for (int r = 0; r < R; r++)
            _mm512_storeu_ps(scd[r] + i, _mm512_mul_ps(dv, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + r * ng + g + i))));
        }
      }
      __m512i xl = _mm512_loadu_si512((const void*)(xp + g * 64)), xh = _mm512_loadu_si512((const void*)(xp + g * 64 + 64));
      for (int r = 0; r < R; r++) {
        PF(w + r * rb + g * 32);
        __m512i b = _mm512_loadu_si512((const void*)(w + r * rb + g * 32));
        __m512i lo = _mm512_and_si512(b, m4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
        __m512i is = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
        double s2;
        memcpy(&s2, scd[r] + (g & 63), sizeof s2);
        __m512 sv = _mm512_permutexvar_ps(pidx, _mm512_castpd_ps(_mm512_set1_pd(s2)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), sv, acc[r]);
      }
    }
    for (int r = 0; r < R; r++) tail[r] = _mm512_reduce_add_ps(acc[r]);
    if (ng & 1) {  /* odd group count: the last group alone, 32 bytes */
      int g = ng - 1;
      const __m256i m4h = _mm256_set1_epi8(15);
      __m256i xl = _mm256_loadu_si256((const __m256i*)(xr + g * 64)), xh = _mm256_loadu_si256((const __m256i*)(xr + g * 64 + 32));
      for (int r = 0; r < R; r++) {
        __m256i b = _mm256_loadu_si256((const __m256i*)(w + r * rb + g * 32));
        __m256i lo = _mm256_and_si256(b, m4h), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4h);
        __m256i is = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
        tail[r] += hsum8(_mm256_cvtepi32_ps(is)) * ((g & 63) ? scd[r][g & 63] : dr[g] * h2f(sc[r * ng + g]));
      }
    }
    done = 1;
  } else if (G % 128 == 0) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 acc[NR4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
      __m512i is[NR4];
      for (int r = 0; r < R; r++) is[r] = _mm512_setzero_si512();
      for (int j = 0; j < h; j += 64) {
        __m512i xl = _mm512_loadu_si512((const void*)(xr + g * G + j));
        __m512i xh = _mm512_loadu_si512((const void*)(xr + g * G + h + j));
        for (int r = 0; r < R; r++) {
          PF(w + r * rb + g * h + j);
          __m512i b = _mm512_loadu_si512((const void*)(w + r * rb + g * h + j));
          __m512i lo = _mm512_and_si512(b, m4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
          is[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(is[r], lo, xl), hi, xh);
        }
      }
      const float dg = dr[g];
      for (int r = 0; r < R; r++)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), _mm512_set1_ps(dg * h2f(sc[r * ng + g])), acc[r]);
    }
    for (int r = 0; r < R; r++) tail[r] = _mm512_reduce_add_ps(acc[r]);
    done = 1;
  }
#endif
#ifdef INT_DOT_AVX2
  __m256 acc[NR4];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  if (done) {
  } else if (G >= 64) {
    const __m256i m4 = _mm256_set1_epi8(15), one16 = _mm256_set1_epi16(1);
    float scd[NR4][64];  /* weight scale x activation scale of each group, 64 groups at a time */
    for (int g = 0; g < ng; g++) {
      if ((g & 63) == 0) {
        int gn = ng - g < 64 ? ng - g : 64, i = 0;
        for (; i + 8 <= gn; i += 8) {
          __m256 dv = _mm256_loadu_ps(dr + g + i);
          for (int r = 0; r < R; r++)
            _mm256_storeu_ps(scd[r] + i, _mm256_mul_ps(dv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sc + r * ng + g + i)))));
        }
        for (; i < gn; i++) for (int r = 0; r < R; r++) scd[r][i] = dr[g + i] * h2f(sc[r * ng + g + i]);
      }
      __m256i is[NR4];
      for (int r = 0; r < R; r++) is[r] = _mm256_setzero_si256();
      for (int j = 0; j < h; j += 32) {
        __m256i xl = _mm256_loadu_si256((const __m256i*)(xr + g * G + j));
        __m256i xh = _mm256_loadu_si256((const __m256i*)(xr + g * G + h + j));
        for (int r = 0; r < R; r++) {
          if (!((g * h + j) & 63)) PF(w + r * rb + g * h + j);
          __m256i b = _mm256_loadu_si256((const __m256i*)(w + r * rb + g * h + j));
          __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
          __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
          is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(p, one16));
        }
      }
      for (int r = 0; r < R; r++)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r]), _mm256_broadcast_ss(scd[r] + (g & 63)), acc[r]);
    }
    for (int r = 0; r < R; r++) tail[r] = hsum8(acc[r]);
  } else { /* G == 32: one 16-byte group per step */
    const __m128i m4 = _mm_set1_epi8(15), one16 = _mm_set1_epi16(1);
    __m128 a4[NR4];
    for (int r = 0; r < R; r++) a4[r] = _mm_setzero_ps();
    for (int g = 0; g < ng; g++) {
      __m128i xl = _mm_loadu_si128((const __m128i*)(xr + g * 32));
      __m128i xh = _mm_loadu_si128((const __m128i*)(xr + g * 32 + 16));
      const float dg = dr[g];
      for (int r = 0; r < R; r++) {
        if (!(g & 3)) PF(w + r * rb + g * 16);
        __m128i b = _mm_loadu_si128((const __m128i*)(w + r * rb + g * 16));
        __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
        __m128i p = _mm_add_epi16(_mm_maddubs_epi16(lo, xl), _mm_maddubs_epi16(hi, xh));
        a4[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(p, one16)), _mm_set1_ps(h2f(sc[r * ng + g]) * dg), a4[r]);
      }
    }
    for (int r = 0; r < R; r++) {
      __m128 s = _mm_add_ps(a4[r], _mm_movehl_ps(a4[r], a4[r]));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      tail[r] = _mm_cvtss_f32(s);
    }
  }
#else
  for (int r = 0; r < R; r++) {
    const uint8_t* wr = w + r * rb;
    float a = 0.f;
    for (int g = 0; g < ng; g++) {
      int s = 0;
      for (int j = 0; j < h; j++) {
        uint8_t b = wr[g * h + j];
        s += (int)(b & 15) * (int)xr[g * G + j] + (int)(b >> 4) * (int)xr[g * G + h + j];
      }
      a += h2f(sc[r * ng + g]) * dr[g] * (float)s;
    }
    tail[r] = a;
  }
#endif
  for (int r = 0; r < R; r++) {
    float t = tail[r];
    int g = 0;
#ifdef INT_DOT_AVX2
    __m256 mv = _mm256_setzero_ps();
    for (; g + 8 <= ng; g += 8)
      mv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + r * ng + g))),
                           _mm256_loadu_ps(xsr + g), mv);
    t += hsum8(mv);
#endif
    for (; g < ng; g++) t += h2f(mn[r * ng + g]) * xsr[g];
    out[r] = t;
  }
}

/* y = x W^T (+ bias) with W int4 (packed (N, K/2), sc/mn fp16 (N, K/G)), x quantized to int8 per group */
/* The activation side of one int4 call: rows quantized per group (q8_prep) and, for the VNNI G = 64
   kernel, the copy with group pairs interleaved ([g lo | g+1 lo | g hi | g+1 hi], 32 bytes each). */
static int q4_prep(const float* x, int M, int K, int G, qact* a) {
  if (q8_prep(x, M, K, G, a)) return -1;
#ifdef INT_DOT_VNNI
  if (G == 64) {
    const int8_t* xq = a->xq;
    int ng = K / G;
    int8_t* pp = tl_xq + (int64_t)M * K + 64;
    for (int m = 0; m < M; m++)
      for (int g = 0; g + 2 <= ng; g += 2) {
        const int8_t* src = xq + (int64_t)m * K + g * 64;
        int8_t* dst = pp + (int64_t)m * K + g * 64;
        memcpy(dst, src, 32); memcpy(dst + 32, src + 64, 32);
        memcpy(dst + 64, src + 32, 32); memcpy(dst + 96, src + 96, 32);
      }
    a->xp = pp;
  }
#endif
  return 0;
}

/* out[0..nr) = rows n0..n0+nr of W (int4) times activation row m (no bias) */
static inline __attribute__((always_inline)) void w4q_tile(const qact* a, int m, const uint8_t* w, const uint16_t* sc,
                                                          const uint16_t* mn, int n0, int nr, int K, int G, float* out) {
  int ng = K / G;
  const uint8_t* wq = w + (int64_t)n0 * (K / 2);
  const uint16_t* scq = sc + (int64_t)n0 * ng;
  const uint16_t* mnq = mn + (int64_t)n0 * ng;
  const int8_t* xr = a->xq + (int64_t)m * K;
  const float* dr = a->d + (int64_t)m * ng;
  const float* xsr = a->xs + (int64_t)m * ng;
  const int8_t* xpr = a->xp ? a->xp + (int64_t)m * K : 0;
  if (nr == NR4) w4q_rows(xr, xpr, dr, xsr, wq, scq, mnq, K, G, NR4, out);
  else for (int r = 0; r < nr; r++)
    w4q_rows(xr, xpr, dr, xsr, wq + (int64_t)r * (K / 2), scq + (int64_t)r * ng, mnq + (int64_t)r * ng, K, G, 1, out + r);
}

/* y = x W^T (+ bias) with W int4 (packed (N, K/2), sc/mn fp16 (N, K/G)), x quantized to int8 per group */
int w4q_mm(const float* x, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, const float* bias, float* y,
           int M, int N, int K, int G, int nth) {
  qact a;
  if (q4_prep(x, M, K, G, &a)) return -1;
  int nq = (N + NR4 - 1) / NR4;
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int t = 0; t < nq; t++) {
    int n0 = t * NR4, nr = N - n0 < NR4 ? N - n0 : NR4;
    for (int m = 0; m < M; m++) {
      float out[NR4];
      w4q_tile(&a, m, w, sc, mn, n0, nr, K, G, out);
      for (int r = 0; r < nr; r++) y[(int64_t)m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.f);
    }
  }
  return 0;
}

static inline float silu1(float v) { return v / (1.f + expf(-v)); }

/* A gated MLP's first half in one call: y = silu(x Wg^T + bg) * (x Wu^T + bu), both int4 with the same
   (N, K, G): one activation quantization, one call, no intermediate tensors. */
int w4q_gu_mm(const float* x, const uint8_t* wg, const uint16_t* scg, const uint16_t* mng, const float* bg,
              const uint8_t* wu, const uint16_t* scu, const uint16_t* mnu, const float* bu, float* y,
              int M, int N, int K, int G, int nth) {
  qact a;
  if (q4_prep(x, M, K, G, &a)) return -1;
  int nq = (N + NR4 - 1) / NR4;
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int t = 0; t < nq; t++) {
    int n0 = t * NR4, nr = N - n0 < NR4 ? N - n0 : NR4;
    for (int m = 0; m < M; m++) {
      float og[NR4], ou[NR4];
      w4q_tile(&a, m, wg, scg, mng, n0, nr, K, G, og);
      w4q_tile(&a, m, wu, scu, mnu, n0, nr, K, G, ou);
      for (int r = 0; r < nr; r++)
        y[(int64_t)m * N + n0 + r] = silu1(og[r] + (bg ? bg[n0 + r] : 0.f)) * (ou[r] + (bu ? bu[n0 + r] : 0.f));
    }
  }
  return 0;
}

/* The same calls with the weight-side arguments in one struct built once per layer (bind_decode): a
   ctypes call costs ~0.15 us per argument, and a decoded token makes ~80 of them. */
typedef struct { const void* w; const void* s; const void* mn; const float* bias; int N, K, G, pad; } qctx;
int w8q_call(const float* x, float* y, int M, int nth, const qctx* c) {
  return w8q_mm(x, (const int8_t*)c->w, (const float*)c->s, c->bias, y, M, c->N, c->K, c->G, nth);
}
int w4q_call(const float* x, float* y, int M, int nth, const qctx* c) {
  return w4q_mm(x, (const uint8_t*)c->w, (const uint16_t*)c->s, (const uint16_t*)c->mn, c->bias, y, M, c->N, c->K, c->G, nth);
}
/* gate + up of one gated MLP (two bound layers of the same shape and format) */
int w8q_gu_call(const float* x, float* y, int M, int nth, const qctx* g, const qctx* u) {
  return w8q_gu_mm(x, (const int8_t*)g->w, (const float*)g->s, g->bias, (const int8_t*)u->w, (const float*)u->s, u->bias,
                   y, M, g->N, g->K, g->G, nth);
}
int w4q_gu_call(const float* x, float* y, int M, int nth, const qctx* g, const qctx* u) {
  return w4q_gu_mm(x, (const uint8_t*)g->w, (const uint16_t*)g->s, (const uint16_t*)g->mn, g->bias,
                   (const uint8_t*)u->w, (const uint16_t*)u->s, (const uint16_t*)u->mn, u->bias, y, M, g->N, g->K, g->G, nth);
}
"""

class _QCtx(ctypes.Structure):
    """The C ``qctx``: one quantized Linear's weight-side kernel arguments (see :func:`bind_decode`)."""

    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("mn", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int), ("K", ctypes.c_int), ("G", ctypes.c_int), ("pad", ctypes.c_int)]


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()
_backend_override: Backend | None = None
_threads: int | None = None  # set_threads() override
_configured_threads: int | None = None  # VERTICALS_QUANT_THREADS (Settings.quant_threads), read once
_act_quant = True  # integer-dot kernels (int8 activations); False = float-activation kernels
_row_threshold = ROW_THRESHOLD


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


def _build(march: str = "native") -> ctypes.CDLL:
    """Compile (once) and load the kernels. ``march="x86-64"`` builds the portable C loops (no AVX):
    the tests use it to check the fallback code against the same references."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    key = hashlib.sha256((_C_SOURCE + _cpu_flags() + cc + march).encode()).hexdigest()[:16]
    out = _cache_dir() / f"qkernels_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(f".{os.getpid()}.c")
        tmp = out.with_suffix(f".{os.getpid()}.so.tmp")
        src.write_text(_C_SOURCE)
        cmd = [cc, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(tmp)]
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
    lib.q8_rows.argtypes = [P, P, P, P, Ci, Ci, Ci]
    lib.q8_rows.restype = None
    lib.w8q_mm.argtypes = [P, P, P, P, P, Ci, Ci, Ci, Ci, Ci]
    lib.w8q_mm.restype = Ci
    lib.w4q_mm.argtypes = [P, P, P, P, P, P, Ci, Ci, Ci, Ci, Ci]
    lib.w4q_mm.restype = Ci
    for f in (lib.w8q_call, lib.w4q_call):
        f.argtypes = [P, P, Ci, Ci, ctypes.POINTER(_QCtx)]
        f.restype = Ci
    for f in (lib.w8q_gu_call, lib.w4q_gu_call):
        f.argtypes = [P, P, Ci, Ci, ctypes.POINTER(_QCtx), ctypes.POINTER(_QCtx)]
        f.restype = Ci
    lib.w8q_gu_mm.argtypes = [P, P, P, P, P, P, P, P, Ci, Ci, Ci, Ci, Ci]
    lib.w8q_gu_mm.restype = Ci
    lib.w4q_gu_mm.argtypes = [P, P, P, P, P, P, P, P, P, P, Ci, Ci, Ci, Ci, Ci]
    lib.w4q_gu_mm.restype = Ci
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


def set_activation_quant(on: bool | None) -> None:
    """Integer-dot kernels (activation rows quantized to int8 per block, the default) or the float-activation
    kernels (exact: x stays fp32, the weight codes are widened to fp32). None = the default (on)."""
    global _act_quant
    _act_quant = True if on is None else bool(on)


def activation_quant() -> bool:
    return _act_quant


def set_row_threshold(n: int | None) -> None:
    """Rows of x up to which the C kernel is used (None = ``ROW_THRESHOLD``). The bench raises it to run
    perplexity through the decode kernels, which measures what activation quantization costs in quality."""
    global _row_threshold
    _row_threshold = ROW_THRESHOLD if n is None else int(n)


def act_block(K: int) -> int:
    """Activation quantization block of the int8 integer-dot kernel for input width K (0 = K unsupported)."""
    return 64 if K % 64 == 0 else 32 if K % 32 == 0 else 0


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


def _kernel_lib(x: torch.Tensor, M: int, backend: Backend | None) -> ctypes.CDLL | None:
    """The kernel library when the C kernel takes this call (fp32 rows, at most the row threshold, no
    autograd, backend not forced to dequant), else None. Kept lean: it runs ~70 times per decoded token."""
    if ((backend or _backend_override) == "dequant" or M > _row_threshold or x.dtype != torch.float32
            or x.requires_grad or x.device.type != "cpu"):
        return None
    return _lib if _lib is not None else c_library()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                backend: Backend | None = None) -> torch.Tensor:
    """x (..., K) fp32, q int8 (N, K), scale fp32 (N,) -> (..., N)."""
    K = x.shape[-1]
    N = q.shape[0]
    M = x.numel() // K if K else 0
    lib = _kernel_lib(x, M, backend)
    if lib is not None:
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)  # a Size + tuple shape costs ~2 us more
        B, nth = act_block(K), kernel_threads()
        if not (_act_quant and B and lib.w8q_mm(x.data_ptr(), q.data_ptr(), scale.data_ptr(), _ptr(bias),
                                               y.data_ptr(), M, N, K, B, nth) == 0):
            lib.w8_mm(x.data_ptr(), q.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K, nth)
        return y
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
    M = x.numel() // K if K else 0
    lib = _kernel_lib(x, M, backend)
    if lib is not None and scale.dtype == torch.float16 and minv.dtype == torch.float16:
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)  # a Size + tuple shape costs ~2 us more
        nth = kernel_threads()
        if not (_act_quant and group_size % 32 == 0 and lib.w4q_mm(
                x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minv.data_ptr(), _ptr(bias), y.data_ptr(),
                M, N, K, group_size, nth) == 0):
            xs = x.view(M, K // group_size, group_size).sum(-1).contiguous()  # (M, K/G)
            lib.w4_mm(x.data_ptr(), xs.data_ptr(), packed.data_ptr(), scale.data_ptr(), minv.data_ptr(),
                      _ptr(bias), y.data_ptr(), M, N, K, group_size, nth)
        return y
    w = dequantize_int4(packed, scale, minv, group_size).to(x.dtype)
    return F.linear(x, w, bias)



def _bind_ctx(lib: ctypes.CDLL, bits: int, q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor | None,
              group_size: int, bias: torch.Tensor | None) -> tuple[ctypes._Pointer, int, int] | None:
    """(the C ``qctx`` of one quantized Linear, N, K), or None when the integer-dot kernel can never take it."""
    ts = [t for t in (q, scale, minv, bias) if t is not None]
    if (any(t.device.type != "cpu" or not t.is_contiguous() for t in ts)
            or (bias is not None and bias.dtype != torch.float32)):
        return None
    N, pb = q.shape[0], _ptr(bias)
    if bits == 8:
        K = q.shape[1]
        B = act_block(K)
        if not B or q.dtype != torch.int8 or scale.dtype != torch.float32:
            return None
        return ctypes.pointer(_QCtx(q.data_ptr(), scale.data_ptr(), None, pb, N, K, B, 0)), N, K
    if minv is None or q.dtype != torch.uint8 or scale.dtype != torch.float16 or minv.dtype != torch.float16:
        return None
    K, G = q.shape[1] * 2, group_size
    if G % 32 or K % G:
        return None
    return ctypes.pointer(_QCtx(q.data_ptr(), scale.data_ptr(), minv.data_ptr(), pb, N, K, G, 0)), N, K


def _decode_rows(x: torch.Tensor, K: int) -> int:
    """Rows of x when this call is one for the integer-dot kernels, else 0."""
    if (x.dtype != torch.float32 or x.shape[-1] != K or not _act_quant or _backend_override == "dequant"
            or x.requires_grad or not x.is_cpu):
        return 0
    M = x.numel() // K
    return M if M <= _row_threshold else 0


def bind_decode(bits: int, q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor | None, group_size: int,
                bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """The integer-dot kernel call of one quantized Linear with its weight-side arguments (pointers,
    shapes, kernel function) worked out once: ``run(x)`` returns y, or None when this call is not one
    for the kernel (more rows than the threshold, autograd, not fp32 / CPU, backend forced to dequant,
    activation quantization off); the caller then takes :func:`int8_linear` / :func:`int4_linear`,
    which give the same result. Returns None when the layer can never take the kernel (no library,
    weights not contiguous fp32 / fp16 CPU tensors, width the kernel does not take).

    Why: a decoded token makes ~80 such calls and at decode shapes the Python around the kernel
    (checks, pointer conversions, output allocation) costs as much as a small kernel itself. The
    pointers stay valid only while the caller holds these same tensors unchanged in place (the
    caller keys its cache on them)."""
    lib = c_library()
    bound = None if lib is None else _bind_ctx(lib, bits, q, scale, minv, group_size, bias)
    if bound is None:
        return None
    ctx, N, K = bound
    return _decode_runner(lib.w8q_call if bits == 8 else lib.w4q_call, N, K, ctx)


def _decode_runner(fn: Any, N: int, K: int, *ctxs: Any) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``run(x)``: the bound C entry ``fn(x, y, M, threads, *ctxs)`` on a decode-shaped fp32 ``x``
    (..., K) into a new (..., N) output; None when ``x`` cannot take it or the call fails."""
    f32 = torch.float32

    def run(x: torch.Tensor) -> torch.Tensor | None:
        M = _decode_rows(x, K)
        if not M:
            return None
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], N, dtype=f32)
        if fn(x.data_ptr(), y.data_ptr(), M, _threads or kernel_threads(), *ctxs) != 0:
            return None
        return y

    return run


def bind_gate_up(bits: int, gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                 up: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                 group_size: int) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """``run(x)`` = silu(gate(x)) * up(x) of a gated MLP in one kernel call (``gate`` / ``up`` = the
    (qweight, scale, minv, bias) of two quantized Linears of the same shape and format): the activation
    row is quantized once and no intermediate tensor is made. None results / returns as in
    :func:`bind_decode` (the caller then runs the two Linears)."""
    lib = c_library()
    if lib is None:
        return None
    bg = _bind_ctx(lib, bits, *gate[:3], group_size, gate[3])
    bu = _bind_ctx(lib, bits, *up[:3], group_size, up[3])
    if bg is None or bu is None or bg[1:] != bu[1:] or gate[0].shape != up[0].shape:
        return None
    (cg, N, K), cu = bg, bu[0]
    return _decode_runner(lib.w8q_gu_call if bits == 8 else lib.w4q_gu_call, N, K, cg, cu)

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
        fns["fp32_c_matvec"] = lambda: f32_matvec(x, w)
        fns["int8_c_kernel"] = lambda: int8_linear(x, q8, s8, backend="c")
        fns["int4_c_kernel"] = lambda: int4_linear(x, p4, sc, mn, group_size, backend="c")

        def float_act(f):  # the same kernels with fp32 activations (no activation quantization)
            def run() -> None:
                old = _act_quant
                set_activation_quant(False)
                try:
                    f()
                finally:
                    set_activation_quant(old)
            return run

        fns["int8_c_kernel_fp32_act"] = float_act(lambda: int8_linear(x, q8, s8, backend="c"))
        fns["int4_c_kernel_fp32_act"] = float_act(lambda: int4_linear(x, p4, sc, mn, group_size, backend="c"))
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
