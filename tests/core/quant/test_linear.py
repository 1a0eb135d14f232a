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
