from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.quant import kernels
from core.quant.formats import QuantSpec, dequantize_activation_int8, quantize_activation_int8
from core.quant.linear import QuantLinear, linear_weight_bytes, quantizable_linears, quantize_rtn


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128, "fp32")])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("backend", ["c", "c_fp32_act", "dequant"])
def test_quantized_matmul_matches_dequantized_reference(quant_home, spec: QuantSpec, rows: int, backend: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 72, bias=True)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(rows, 256)
    # The integer-dot kernel multiplies int8-quantized activations: its exact reference is the dequantized
    # weight times the dequantized activation. It runs for up to ROW_THRESHOLD rows with fp16 scales.
    int_dot = (backend == "c" and kernels.c_library() is not None and rows <= kernels.ROW_THRESHOLD
               and spec.scale_dtype == "fp16")
    xr = x
    if int_dot:
        block = spec.group_size if spec.bits == 4 else kernels.act_block(256)
        xr = dequantize_activation_int8(*quantize_activation_int8(x, block))
    ref = F.linear(xr, q.dequantized(), q.bias)
    kernels.set_backend("dequant" if backend == "dequant" else "c")
    kernels.set_activation_quant(backend == "c")
    try:
        y = q(x)
    finally:
        kernels.set_backend(None)
        kernels.set_activation_quant(None)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    # and close to the float layer it replaces (activation quantization adds ~0.5% relative error)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < (0.02 if spec.bits == 8 else 0.15)


def test_c_kernel_builds_here(quant_home) -> None:
    if kernels.c_library() is None:
        pytest.skip(f"no C kernel on this machine: {kernels.c_library_error()}")
    assert kernels.active_backend() == "c"


def test_awq_input_scale_is_exact_in_float(quant_home) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 16, bias=False)
    s = torch.rand(128) + 0.5
    q = QuantLinear.from_linear(lin, QuantSpec(8), input_scale=s)
    x = torch.randn(3, 128)
    kernels.set_activation_quant(False)  # exactness of the scale identity: float activations
    try:
        assert torch.allclose(q(x), F.linear(x, q.dequantized()), atol=1e-4)
    finally:
        kernels.set_activation_quant(None)
    assert torch.allclose(q(x), lin(x), atol=0.05)


def test_replace_in_sequential_and_bytes_shrink(quant_home) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    x = torch.randn(4, 128)
    ref = model(x)
    fp = linear_weight_bytes(model)
    names = list(quantizable_linears(model))
    quantize_rtn(model, {n: QuantSpec(4, 64) for n in names})
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert linear_weight_bytes(model) < 0.2 * fp
    assert (model(x) - ref).norm() / ref.norm() < 0.15


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 64)])
def test_bound_decode_call_matches_kernel_and_rebinds(quant_home, spec: QuantSpec) -> None:
    """QuantLinear binds its weight-side kernel arguments once (``kernels.bind_decode``): same result as
    the unbound call, no binding for calls the kernel does not take, and a fresh binding when a buffer
    is replaced (stale pointers would read freed or old weights)."""
    import copy
    import io

    if kernels.c_library() is None:
        pytest.skip(f"no C kernel on this machine: {kernels.c_library_error()}")
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=True)
    q = QuantLinear.from_linear(lin, spec)

    def unbound(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if spec.bits == 8:
            return kernels.int8_linear(x, m.qweight, m.scale, m.bias)
        return kernels.int4_linear(x, m.qweight, m.scale, m.minv, spec.group_size, m.bias)

    x = torch.randn(1, 3, 128)
    y = q(x)
    run = q.__dict__["_decode"][5]
    assert run is not None and torch.equal(y, unbound(q, x))
    assert torch.equal(run(x), y) and y.shape == (1, 3, 40)
    # calls the kernel does not take: the bound call declines, forward falls back (same figures as before)
    assert run(torch.randn(kernels.ROW_THRESHOLD + 1, 128)) is None
    assert run(torch.randn(2, 128, requires_grad=True)) is None
    kernels.set_activation_quant(False)
    try:
        assert run(x) is None
        assert torch.allclose(q(x), F.linear(x, q.dequantized(), q.bias), atol=1e-4)
    finally:
        kernels.set_activation_quant(None)
    # a replaced buffer is rebound: the output follows the new weights
    other = QuantLinear.from_linear(nn.Linear(128, 40, bias=True), spec)
    q.qweight = other.qweight.clone()
    q.bias = other.bias.clone()
    assert q.__dict__["_decode"][0] is not q.qweight
    y2 = q(x)
    assert q.__dict__["_decode"][0] is q.qweight
    assert torch.equal(y2, unbound(q, x)) and not torch.allclose(y2, y)
    # in-place changes keep the pointers valid
    q.scale.mul_(2)
    assert torch.equal(q(x), unbound(q, x))
    # copies bind their own buffers (the binding is never pickled or deep-copied)
    c = copy.deepcopy(q)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    expect = unbound(q, x)
    del q
    for m in (c, loaded):
        assert torch.equal(m(x), expect)
        assert m.__dict__["_decode"][0] is m.qweight
