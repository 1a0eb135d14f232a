"""Weight formats of the quantized runtime: int8 per output channel and packed int4 group-wise.

Data contracts (what every other module of ``core.quant`` relies on):

- **int8** ``qweight`` int8 (N, K) symmetric, ``scale`` (N,) so that ``W ~= qweight * scale[:, None]``.
- **int4** ``qweight`` uint8 (N, K/2), two 4-bit codes per byte, ``scale`` and ``minv`` (N, K/G) so that
  ``W[n, g*G + j] ~= code * scale[n, g] + minv[n, g]`` (asymmetric, codes 0..15). Inside each group
  byte ``j`` (``j < G/2``) holds element ``j`` in its low nibble and element ``j + G/2`` in its high
  nibble: both halves of a group then unpack with one shift/mask over contiguous bytes, which is what
  the SIMD kernel in ``core.quant.kernels`` wants.
- Scales are stored as fp16 (default) or fp32; the kernels read fp16 directly.

Why asymmetric int4 with a min offset: a group's weights are rarely centred on zero; using the
range [min, max] instead of [-absmax, absmax] halves the step size for skewed groups (the same
choice as llama.cpp's Q4_1/Q4_K and AWQ's zero points).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from core.errors import ConfigError

SUPPORTED_BITS = (8, 4)
SUPPORTED_GROUPS = (32, 64, 128)
ScaleDtype = Literal["fp16", "fp32"]


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear is stored. ``bits=16`` means 'keep in floating point' (mixed precision)."""

    bits: int = 8
    group_size: int = 64
    scale_dtype: ScaleDtype = "fp16"

    def __post_init__(self) -> None:
        check_bits(self.bits, allow_fp=True)
        if self.bits == 4 and self.group_size not in SUPPORTED_GROUPS:
            raise ConfigError(f"group size {self.group_size} is not supported; choose one of {SUPPORTED_GROUPS}")
        if self.scale_dtype not in ("fp16", "fp32"):
            raise ConfigError(f"scale dtype {self.scale_dtype!r} must be 'fp16' or 'fp32'")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return torch.float16 if self.scale_dtype == "fp16" else torch.float32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_bits(bits: int | str, *, allow_fp: bool = False) -> int:
    """Validate a bit width given by a user; 3, 5, 'x' ... get a clear error."""
    try:
        b = int(bits)
    except (TypeError, ValueError):
        b = -1
    ok = SUPPORTED_BITS + ((16,) if allow_fp else ())
    if b not in ok:
        raise ConfigError(f"bits={str(bits).strip()} is not supported; choose one of {', '.join(map(str, ok))}"
                          + (" (or 'mixed' on the command line)" if not allow_fp else ""))
    return b


# ---------------------------------------------------------------------------------------------------
# int8 per output channel
# ---------------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (qweight int8 (N, K), scale fp32 (N,)), symmetric absmax per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# ---------------------------------------------------------------------------------------------------
# int4 group-wise, packed two per byte
# ---------------------------------------------------------------------------------------------------
def _check_group(K: int, group_size: int) -> None:
    if group_size not in SUPPORTED_GROUPS:
        raise ConfigError(f"group size {group_size} is not supported; choose one of {SUPPORTED_GROUPS}")
    if K % group_size:
        raise ConfigError(f"input width {K} is not a multiple of the int4 group size {group_size}")


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes uint8 (N, K) in 0..15 -> packed uint8 (N, K/2) in the in-group half-split layout."""
    N, K = codes.shape
    _check_group(K, group_size)
    if codes.numel() and int(codes.max()) > 15:
        raise ConfigError("int4 codes must lie in 0..15")
    c = codes.to(torch.uint8).view(N, K // group_size, group_size)
    h = group_size // 2
    return (c[..., :h] | (c[..., h:] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """packed uint8 (N, K/2) -> codes uint8 (N, K); inverse of :func:`pack_int4`."""
    N, half = packed.shape
    K = half * 2
    _check_group(K, group_size)
    p = packed.view(N, K // group_size, group_size // 2)
    return torch.cat([p & 15, p >> 4], dim=-1).reshape(N, K)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round w (N, K) onto the given group grid -> codes uint8 (N, K)."""
    N, K = w.shape
    wg = w.float().view(N, K // group_size, group_size)
    q = torch.round((wg - minv.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).view(N, K)


def int4_grid(w: torch.Tensor, group_size: int, *, clip_search: bool = True,
              scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, minv) (N, K/G), rounded to ``scale_dtype`` so quantization uses the stored values.

    ``clip_search`` shrinks each group's [min, max] range by the factor (1.0 .. 0.75) that minimises
    the group's squared rounding error: clipping a few outliers buys a finer step for the rest
    (the range search used by AWQ and llama.cpp's quantizers).
    """
    N, K = w.shape
    _check_group(K, group_size)
    wg = w.detach().float().view(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_m = lo.clone(), lo.clone()
    shrinks = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75) if clip_search else (1.0,)
    for f in shrinks:
        mid = (hi + lo) / 2
        l_f, h_f = mid + (lo - mid) * f, mid + (hi - mid) * f
        s = ((h_f - l_f) / 15.0).clamp_min(1e-8).to(scale_dtype).float()
        m = l_f.to(scale_dtype).float()
        q = torch.round((wg - m[..., None]) / s[..., None]).clamp(0, 15)
        err = ((q * s[..., None] + m[..., None]) - wg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s.to(scale_dtype), best_m.to(scale_dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 64, *, clip_search: bool = True,
                  scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> (packed uint8 (N, K/2), scale (N, K/G), minv (N, K/G))."""
    scale, minv = int4_grid(w, group_size, clip_search=clip_search, scale_dtype=scale_dtype)
    codes = int4_codes(w, scale, minv, group_size)
    return pack_int4(codes, group_size), scale, minv


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """-> float32 (N, K)."""
    codes = unpack_int4(packed, group_size)
    N, K = codes.shape
    w = codes.view(N, K // group_size, group_size).float() * scale.float()[..., None] + minv.float()[..., None]
    return w.view(N, K)


# ---------------------------------------------------------------------------------------------------
# int8 activations (what the integer-dot kernels multiply by): symmetric, one scale per block of a row
# ---------------------------------------------------------------------------------------------------
def quantize_activation_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float -> (xq int8 (..., K) in -127..127, d fp32 (..., K/block)) with x ~= xq * d, computed
    exactly as the C kernel does (d = absmax / 127, xq = round-half-even(x * (127 / absmax)), in fp32)."""
    K = x.shape[-1]
    if block <= 0 or K % block:
        raise ConfigError(f"input width {K} is not a multiple of the activation block {block}")
    xb = x.detach().float().reshape(*x.shape[:-1], K // block, block)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return xq.reshape(x.shape), amax / 127.0


def dequantize_activation_int8(xq: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    K = xq.shape[-1]
    block = K // d.shape[-1]
    return (xq.float().reshape(*xq.shape[:-1], -1, block) * d[..., None]).reshape(xq.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip_search: bool = True) -> torch.Tensor:
    """Quantize then dequantize w (N, K) with ``spec`` (used for sensitivity scans and GPTQ checks)."""
    if spec.bits == 16:
        return w.detach().float().clone()
    if spec.bits == 8:
        return dequantize_int8(*quantize_int8(w))
    return dequantize_int4(*quantize_int4(w, spec.group_size, clip_search=clip_search,
                                          scale_dtype=spec.torch_scale_dtype), group_size=spec.group_size)


def stored_bytes(N: int, K: int, spec: QuantSpec, bias: bool = False) -> int:
    """Bytes of weights + scales (+ bias, fp32) of one N x K Linear stored with ``spec``."""
    b = 4 * N if bias else 0
    if spec.bits == 16:
        return 4 * N * K + b
    if spec.bits == 8:
        return N * K + 4 * N + b
    sb = 2 if spec.scale_dtype == "fp16" else 4
    return N * K // 2 + 2 * sb * N * (K // spec.group_size) + b
