from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from core.quant.formats import (
    QuantSpec,
    check_bits,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    stored_bytes,
    unpack_int4,
)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), g=st.sampled_from([32, 64, 128]), seed=st.integers(0, 999))
def test_pack_unpack_round_trip(rows: int, groups: int, g: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, groups * g), generator=gen, dtype=torch.uint8)
    packed = pack_int4(codes, g)
    assert packed.shape == (rows, groups * g // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, g), codes)


def test_pack_layout_is_two_codes_per_byte_half_split() -> None:
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)
    p = pack_int4(codes, 32)
    # byte j holds code j (low nibble) and code j+16 (high nibble)
    assert int(p[0, 3]) == (3 | (((3 + 16) % 16) << 4))


def test_int8_error_is_within_half_a_step() -> None:
    w = torch.randn(64, 96)
    q, s = quantize_int8(w)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_error_small_and_scales_fp16(g: int) -> None:
    w = torch.randn(32, 256)
    p, s, m = quantize_int4(w, g)
    assert s.dtype == torch.float16 and s.shape == (32, 256 // g)
    deq = dequantize_int4(p, s, m, g)
    rel = (deq - w).norm() / w.norm()
    assert rel < 0.12


def test_clip_search_never_hurts() -> None:
    w = torch.randn(16, 128)
    w[0, 0] = 12.0  # an outlier
    a = dequantize_int4(*quantize_int4(w, 64, clip_search=False), group_size=64)
    b = dequantize_int4(*quantize_int4(w, 64, clip_search=True), group_size=64)
    assert (b - w).pow(2).sum() <= (a - w).pow(2).sum() + 1e-6


def test_bad_bits_and_groups_are_clear() -> None:
    with pytest.raises(ConfigError, match="bits=3 is not supported"):
        check_bits(3)
    with pytest.raises(ConfigError, match="not supported"):
        check_bits("x")
    with pytest.raises(ConfigError, match="group size 48"):
        QuantSpec(bits=4, group_size=48)
    with pytest.raises(ConfigError, match="multiple of the int4 group size"):
        quantize_int4(torch.randn(4, 100), 64)


def test_int4_g64_bytes_under_0_16_of_fp32() -> None:
    fp32 = stored_bytes(1024, 1024, QuantSpec(bits=16))
    assert stored_bytes(1024, 1024, QuantSpec(bits=4, group_size=64)) / fp32 <= 0.16
    assert stored_bytes(1024, 1024, QuantSpec(bits=8)) / fp32 < 0.26
