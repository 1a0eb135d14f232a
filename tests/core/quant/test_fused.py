"""The fused gate+up decode path of quantized gated MLPs (core.quant.fused) against the unfused MLP."""

from __future__ import annotations

import copy

import pytest
import torch

from core.model.deepseek import MLP
from core.quant import kernels
from core.quant.fused import QuantGatedMLP, fuse_gated_mlps
from core.quant.linear import QuantLinear
from core.quant.pipeline import quantize_model


def _need_lib() -> None:
    if kernels.c_library() is None:
        pytest.skip(f"no C kernel here: {kernels.c_library_error()}")


def _mlp(dim: int = 128, inter: int = 128, bias: bool = False) -> MLP:
    torch.manual_seed(0)
    m = MLP(dim, inter).eval()
    if bias:  # the kernel's bias handling: give gate/up biases (the core LM has none)
        for lin in (m.gate_proj, m.up_proj):
            lin.bias = torch.nn.Parameter(torch.randn(inter) * 0.1)
    return m


@pytest.mark.parametrize(("bits", "group", "bias", "dim"), [(8, 64, False, 128), (4, 64, False, 320), (4, 32, True, 96),
                                                            (4, 128, False, 256), (8, 64, True, 96)])
def test_fused_matches_the_unfused_mlp(quant_home, bits: int, group: int, bias: bool, dim: int) -> None:
    _need_lib()
    from core.quant.formats import QuantSpec

    m = _mlp(dim, bias=bias)
    spec = QuantSpec(bits=bits, group_size=group)
    for n in ("gate_proj", "up_proj", "down_proj"):
        setattr(m, n, QuantLinear.from_linear(getattr(m, n), spec, clip_search=False))
    plain = copy.deepcopy(m)
    assert fuse_gated_mlps(m) == 1 and type(m) is QuantGatedMLP and type(plain) is MLP
    calls = []
    real = kernels.bind_gate_up

    def spy(*a, **k):
        run = real(*a, **k)
        return None if run is None else (lambda x: calls.append(1) or run(x))

    import core.quant.fused as fused

    fused.bind_gate_up = spy
    try:
        with torch.inference_mode():
            for rows in (1, 3):
                x = torch.randn(1, rows, dim)
                assert torch.allclose(m(x), plain(x), atol=1e-5, rtol=1e-4)
    finally:
        fused.bind_gate_up = real
    assert len(calls) == 2  # both shapes took the fused kernel
    assert m.state_dict().keys() == plain.state_dict().keys()


def test_fused_steps_aside_for_hooks_grad_mixed_formats_and_rebinds(quant_home) -> None:
    _need_lib()
    from core.quant.formats import QuantSpec

    m = _mlp()
    for n, b in (("gate_proj", 4), ("up_proj", 4), ("down_proj", 8)):
        setattr(m, n, QuantLinear.from_linear(getattr(m, n), QuantSpec(bits=b), clip_search=False))
    fuse_gated_mlps(m)
    plain = copy.deepcopy(m)
    plain.__class__ = MLP
    x = torch.randn(1, 1, 128)
    seen = []
    h = m.gate_proj.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x), atol=1e-5, rtol=1e-4)
    assert seen == [1]  # the hook ran: the unfused path
    h.remove()
    # replacing a buffer rebinds (the old pointers are never used again)
    m.up_proj.qweight = m.up_proj.qweight.clone()
    plain.up_proj.qweight = m.up_proj.qweight
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x), atol=1e-5, rtol=1e-4)
    m.up_proj.qweight.zero_()
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x), atol=1e-5, rtol=1e-4)
    # autograd on: the module path (gradients flow to the input)
    xg = torch.randn(1, 1, 128, requires_grad=True)
    m(xg).sum().backward()
    assert xg.grad is not None
    # gate int4, up int8: no fused kernel, same result
    m.up_proj = QuantLinear.from_linear(torch.nn.Linear(128, 128, bias=False), QuantSpec(bits=8))
    plain.up_proj = m.up_proj
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x), atol=1e-5, rtol=1e-4)
    assert m.__dict__["_gate_up"][3] is None


def test_quantize_model_fuses_and_checkpoint_round_trip_keeps_it(quant_home, tiny_model, tmp_path) -> None:
    from core.model.hf import hf_config
    from core.quant.checkpoint import load_quantized, save_quantized

    _need_lib()
    ref = copy.deepcopy(tiny_model)
    rep = quantize_model(tiny_model, 4, method="rtn", group_size=32, clip_search=False, progress=False)
    fused = [n for n, mm in tiny_model.named_modules() if type(mm) is QuantGatedMLP]
    assert fused and not any(type(mm) is MLP for mm in tiny_model.modules())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        a = tiny_model(ids)
        assert torch.isfinite(a).all() and (a - ref(ids)).abs().max() < 1.0
    save_quantized(tiny_model, tmp_path / "q", rep.to_dict(), config=hf_config(tiny_model.args))
    back = load_quantized(tmp_path / "q")
    assert [n for n, mm in back.named_modules() if type(mm) is QuantGatedMLP] == fused
    with torch.inference_mode():
        assert torch.allclose(back(ids), a, atol=1e-5)
    copy.deepcopy(back)  # the bound pointers are not copied
