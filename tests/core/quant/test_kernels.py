"""The C kernels against torch references: int8 activation quantizer, integer-dot int8/int4 kernels at
odd shapes (tails of the 4-row blocks, K not a multiple of the activation block), the float-activation
fallback, and the row threshold switch the bench uses to run perplexity through the decode kernels."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.quant import kernels
from core.quant.formats import (
    dequantize_activation_int8,
    dequantize_int4,
    dequantize_int8,
    quantize_activation_int8,
    quantize_int4,
    quantize_int8,
)


def _lib() -> ctypes.CDLL:
    lib = kernels.c_library()
    if lib is None:
        pytest.skip(f"no C kernel here: {kernels.c_library_error()}")
    return lib


@pytest.mark.parametrize(("rows", "k", "block"), [(1, 64, 32), (3, 256, 64), (2, 384, 128), (1, 96, 32)])
def test_c_activation_quantizer_matches_python(quant_home, rows: int, k: int, block: int) -> None:
    lib = _lib()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g) * torch.linspace(0.01, 5, k)
    x[0, :block] = 0.0  # an all-zero block: scale 0, codes 0
    xq = torch.empty(rows, k, dtype=torch.int8)
    d = torch.empty(rows, k // block)
    xs = torch.empty(rows, k // block)
    lib.q8_rows(x.data_ptr(), xq.data_ptr(), d.data_ptr(), xs.data_ptr(), rows, k, block)
    rq, rd = quantize_activation_int8(x, block)
    assert torch.equal(xq, rq)
    assert torch.allclose(d, rd, rtol=1e-6, atol=0)
    assert torch.allclose(xs, rd * rq.view(rows, -1, block).sum(-1).float(), rtol=1e-6, atol=1e-6)
    assert int(xq.abs().max()) <= 127 and float(d[0, 0]) == 0.0
    # the quantization error is bounded by half a step per block
    err = (dequantize_activation_int8(rq, rd) - x).abs().view(rows, -1, block).amax(-1)
    assert bool((err <= rd / 2 + 1e-6).all())


def test_activation_quantizer_rejects_bad_block() -> None:
    with pytest.raises(ConfigError, match="activation block"):
        quantize_activation_int8(torch.randn(2, 100), 32)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 32), (1, 7, 96), (2, 13, 160), (1, 64, 1024), (3, 33, 704),
                                           (32, 9, 64)])
def test_int8_integer_dot_matches_reference(quant_home, m: int, n: int, k: int) -> None:
    _lib()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    b = torch.randn(n, generator=g)
    q, s = quantize_int8(w)
    y = kernels.int8_linear(x, q, s, b, backend="c")
    xr = dequantize_activation_int8(*quantize_activation_int8(x, kernels.act_block(k)))
    ref = F.linear(xr, dequantize_int8(q, s), b)
    assert torch.allclose(y, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 6), (2, 11), (4, 40)])
def test_int4_integer_dot_matches_reference(quant_home, group: int, m: int, n: int) -> None:
    _lib()
    g = torch.Generator().manual_seed(2)
    k = 3 * group
    w = torch.randn(n, k, generator=g) + 0.3  # skewed groups: the min offset matters
    x = torch.randn(m, k, generator=g)
    p, sc, mn = quantize_int4(w, group)
    y = kernels.int4_linear(x, p, sc, mn, group, backend="c")
    xr = dequantize_activation_int8(*quantize_activation_int8(x, group))
    ref = F.linear(xr, dequantize_int4(p, sc, mn, group))
    assert torch.allclose(y, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-5)


def test_int8_width_off_the_block_grid_takes_the_exact_kernel(quant_home) -> None:
    _lib()
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(10, 70, generator=g), torch.randn(1, 70, generator=g)  # 70 % 32 != 0
    q, s = quantize_int8(w)
    assert kernels.act_block(70) == 0
    y = kernels.int8_linear(x, q, s, backend="c")
    assert torch.allclose(y, F.linear(x, dequantize_int8(q, s)), atol=1e-4)


def test_activation_quant_switch_and_row_threshold(quant_home) -> None:
    _lib()
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(24, 128, generator=g), torch.randn(50, 128, generator=g)
    p, sc, mn = quantize_int4(w, 64)
    exact = F.linear(x, dequantize_int4(p, sc, mn, 64))
    aq = F.linear(dequantize_activation_int8(*quantize_activation_int8(x, 64)), dequantize_int4(p, sc, mn, 64))
    assert not torch.allclose(exact, aq, atol=1e-4)  # the two references differ: the test can tell them apart
    # 50 rows > ROW_THRESHOLD: dequant + BLAS (exact) unless the threshold is raised
    assert torch.allclose(kernels.int4_linear(x, p, sc, mn, 64, backend="c"), exact, atol=1e-4)
    kernels.set_row_threshold(1 << 30)
    try:
        assert torch.allclose(kernels.int4_linear(x, p, sc, mn, 64, backend="c"), aq, atol=1e-4)
        kernels.set_activation_quant(False)
        assert torch.allclose(kernels.int4_linear(x, p, sc, mn, 64, backend="c"), exact, atol=1e-4)
    finally:
        kernels.set_row_threshold(None)
        kernels.set_activation_quant(None)
    assert kernels.activation_quant() and kernels._row_threshold == kernels.ROW_THRESHOLD


def test_microbench_times_both_activation_modes(quant_home) -> None:
    _lib()
    r = kernels.microbench(N=64, K=128, rows=1, reps=2)
    for k in ("fp32_linear", "fp32_c_matvec", "int8_c_kernel", "int4_c_kernel", "int8_c_kernel_fp32_act",
              "int4_c_kernel_fp32_act"):
        assert r[k] > 0
    assert kernels.activation_quant()


# Each instruction-set variant of the library, built with -march=<variant> and run here when this CPU has
# what it needs: "x86-64" = the portable C loops (no AVX), "x86-64-v3" = AVX2 (what an AVX2-only machine
# runs), "x86-64-v4" = AVX-512 without VNNI (AVX2 integer-dot code), "native" = this CPU (AVX-512 VNNI
# integer-dot code where present).
_VARIANT_FLAGS = {"x86-64": (), "x86-64-v3": ("avx2", "fma", "f16c"),
                  "x86-64-v4": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
                  "native": ()}


def _cpu_has(flags: tuple[str, ...]) -> bool:
    return set(flags) <= set(kernels._cpu_flags().split())


@pytest.mark.parametrize("march", list(_VARIANT_FLAGS))
def test_every_instruction_set_variant_matches_the_references(quant_home, march: str) -> None:
    """Every build variant (portable, AVX2, AVX-512, AVX-512 VNNI) against the same torch references,
    at widths that give an odd number of int4 groups and output rows off the kernels' row blocks."""
    _lib()
    if not _cpu_has(_VARIANT_FLAGS[march]):
        pytest.skip(f"this CPU cannot run the {march} build")
    try:
        lib = kernels._build(march=march)
    except RuntimeError as e:
        pytest.skip(f"no {march} build here: {e}")
    g = torch.Generator().manual_seed(5)
    for M, N, K in ((3, 10, 256), (1, 11, 320), (2, 7, 384)):
        x = torch.randn(M, K, generator=g) + 0.5  # a non-zero mean: the VNNI int8 path's offset term matters
        w = torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g)
        _check_variant(lib, x, w, b)


def _check_variant(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    (M, K), N = x.shape, w.shape[0]
    q8, s8 = quantize_int8(w)
    y = torch.empty(M, N)
    for B in (32, 64):
        assert lib.w8q_mm(x.data_ptr(), q8.data_ptr(), s8.data_ptr(), b.data_ptr(), y.data_ptr(), M, N, K, B, 1) == 0
        ref = F.linear(dequantize_activation_int8(*quantize_activation_int8(x, B)), dequantize_int8(q8, s8), b)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5), B
    for G in (32, 64, 128):
        if K % G:
            continue
        p, sc, mn = quantize_int4(w, G)
        assert lib.w4q_mm(x.data_ptr(), p.data_ptr(), sc.data_ptr(), mn.data_ptr(), None, y.data_ptr(),
                          M, N, K, G, 1) == 0
        ref = F.linear(dequantize_activation_int8(*quantize_activation_int8(x, G)), dequantize_int4(p, sc, mn, G))
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5), G
        xs = x.view(M, K // G, G).sum(-1).contiguous()
        lib.w4_mm(x.data_ptr(), xs.data_ptr(), p.data_ptr(), sc.data_ptr(), mn.data_ptr(), None, y.data_ptr(),
                  M, N, K, G, 1)
        assert torch.allclose(y, F.linear(x, dequantize_int4(p, sc, mn, G)), atol=1e-4, rtol=1e-5), G
    lib.w8_mm(x.data_ptr(), q8.data_ptr(), s8.data_ptr(), None, y.data_ptr(), M, N, K, 1)
    assert torch.allclose(y, F.linear(x, dequantize_int8(q8, s8)), atol=1e-4, rtol=1e-5)
    y1 = torch.empty(N)
    lib.f32_mv(x[0].data_ptr(), w.data_ptr(), b.data_ptr(), y1.data_ptr(), N, K, 1)
    assert torch.allclose(y1, F.linear(x[0], w, b), atol=1e-4, rtol=1e-5)
    lib.f32_mm(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), M, N, K, 1)
    assert torch.allclose(y, F.linear(x, w), atol=1e-4, rtol=1e-5)
