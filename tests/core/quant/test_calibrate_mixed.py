from __future__ import annotations

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.quant.calibrate import LayerStats, awq_scale, gptq_quantize, relative_output_error
from core.quant.formats import QuantSpec, dequantize_int4, fake_quantize
from core.quant.mixed import LayerShape, assign_by_size, plan_bytes
from core.quant.pipeline import parse_bits, quantize_model


def _correlated_inputs(n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)
    x = base + 0.1 * torch.randn(n, k, generator=g)
    x[:, :4] *= 20  # a few salient channels, as in LLM activations
    return x


def test_gptq_beats_rounding_on_output_error() -> None:
    torch.manual_seed(0)
    K, N = 128, 64
    w = torch.randn(N, K)
    x = _correlated_inputs(512, K)
    H = 2 * x.T @ x / x.shape[0]
    spec = QuantSpec(4, 32)
    codes, s, m = gptq_quantize(w, H, spec)
    from core.quant.formats import pack_int4

    wq = dequantize_int4(pack_int4(codes, 32), s, m, 32)
    assert relative_output_error(w, wq, x) < relative_output_error(w, fake_quantize(w, spec), x)


def test_awq_never_worse_than_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = _correlated_inputs(256, 128)
    st = LayerStats(x.abs().mean(0), x, None, x.shape[0])
    spec = QuantSpec(4, 64)
    s, err = awq_scale(w, st, spec)
    assert err <= relative_output_error(w, fake_quantize(w, spec, clip_search=False), x) + 1e-9


def test_mixed_assignment_honours_the_budget_and_ranks_sensitivity() -> None:
    shapes = {f"l{i}": LayerShape(256, 256, False) for i in range(10)}
    sens = {f"l{i}": float(i) for i in range(10)}  # l9 most sensitive
    fp32 = 10 * 256 * 256 * 4
    for budget in (0.15, 0.18, 0.2, 0.25, 0.3):
        plan = assign_by_size(shapes, sens, budget)
        assert plan_bytes(shapes, plan) <= budget * fp32
        eights = sorted(int(n[1:]) for n, sp in plan.items() if sp.bits == 8)
        assert eights == list(range(10 - len(eights), 10))  # the most sensitive ones
    assert sum(sp.bits == 8 for sp in assign_by_size(shapes, sens, 0.2).values()) >= 4
    with pytest.raises(ConfigError, match="below what all-int4 reaches"):
        assign_by_size(shapes, sens, 0.1)


def test_parse_bits() -> None:
    assert parse_bits("mixed") == "mixed" and parse_bits("4") == 4 and parse_bits(8) == 8
    with pytest.raises(ConfigError, match="bits=3"):
        parse_bits("3")


@pytest.mark.parametrize("bits,method", [(8, "rtn"), (4, "gptq"), (4, "awq"), ("mixed", "gptq")])
def test_quantize_model_end_to_end(quant_home, tiny_model, calib_batches, bits, method) -> None:
    x = calib_batches[0][:1]
    ref = tiny_model(x)
    rep = quantize_model(tiny_model, bits, method=method, calib_batches=calib_batches, size_budget=0.2,
                         progress=False)
    out = tiny_model(x)
    rel = float((out - ref).detach().norm() / ref.detach().norm())
    assert rel < (0.05 if bits == 8 else 0.4)
    assert rep.linear_bytes_ratio < (0.27 if bits == 8 else 0.21)
    assert all(p["bits"] in (4, 8) for p in rep.plan.values())
    assert any(n.endswith("kv_b_proj") for n in rep.skipped)


def test_int4_needs_calibration(tiny_model) -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_model(tiny_model, 4, method="gptq", calib_batches=None, progress=False)
    with pytest.raises(ConfigError, match="bits=3"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), 3, progress=False)  # type: ignore[arg-type]


def test_mixed_plan_keeps_widths_int4_cannot_take_at_int8() -> None:
    from core.quant.mixed import LayerShape, assign_by_size

    shapes = {"a": LayerShape(64, 128, False), "b": LayerShape(64, 96, False), "c": LayerShape(64, 128, False)}
    plan = assign_by_size(shapes, {"a": 0.5, "c": 0.1}, 0.25, group_size=64)
    assert plan["b"].bits == 8  # 96 is not a multiple of 64
    assert plan["a"].bits == 8 and plan["c"].bits == 4  # the budget buys one upgrade: the sensitive one
    from core.quant.mixed import plan_bytes
    assert plan_bytes(shapes, plan) <= 0.25 * sum(4 * s.out_features * s.in_features for s in shapes.values())
