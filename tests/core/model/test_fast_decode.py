"""Batch-1 decode fast paths: the C fp32 matvec, the fused-attention prefill, the MoE decode branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.model import deepseek
from core.model.deepseek import DeepseekV3, ModelArgs, linear
from core.model.generate import SamplingParams, generate
from core.quant import kernels

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8,  # d_v < d_qk: padded v
            initializer_range=0.1, max_position_embeddings=128)


def _need_kernel() -> None:
    if kernels.c_library() is None:
        pytest.skip(f"no C kernel here: {kernels.c_library_error()}")


@pytest.mark.parametrize(("rows", "n", "k", "bias"), [(1, 48, 64, False), (1, 33, 70, True), (1, 8192, 512, False),
                                                     (2, 33, 70, True), (3, 40, 64, False), (4, 17, 48, True)])
def test_f32_matvec_matches_linear(rows: int, n: int, k: int, bias: bool) -> None:
    _need_kernel()
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    x = torch.randn(1, rows, k, generator=g)
    with torch.no_grad():
        y = kernels.f32_matvec(x, lin.weight, lin.bias)
        assert y is not None and y.shape == (1, rows, n)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_f32_matvec_declines_what_it_cannot_do() -> None:
    w = torch.randn(8, 16)
    assert kernels.f32_matvec(torch.randn(5, 16), w) is None  # more than 4 rows: BLAS
    assert kernels.f32_matvec(torch.randn(1, 16, dtype=torch.float64), w.double()) is None
    assert kernels.f32_matvec(torch.randn(1, 16), w.t().contiguous().t()) is None  # strided weight
    wg = torch.randn(8, 16, requires_grad=True)
    assert kernels.f32_matvec(torch.randn(1, 16), wg) is None  # autograd needs the module's forward


def test_linear_keeps_hooks_and_autograd() -> None:
    lin = nn.Linear(16, 8)
    x = torch.randn(1, 16)
    y = linear(lin, x)  # grad enabled: the module's own forward, differentiable
    assert y.requires_grad
    seen = []
    h = lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        linear(lin, x)
    h.remove()
    assert seen == [torch.Size([1, 8])]  # hooked modules (calibration) still see their inputs


def test_fast_decode_generates_the_same_tokens_as_plain_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _need_kernel()
    torch.manual_seed(0)
    m = DeepseekV3(ModelArgs(**TINY)).eval()
    prompts = [[5, 9, 13, 2, 7, 1, 3, 3, 8], [4, 4]]
    sp = SamplingParams(max_new_tokens=12)
    real, calls = deepseek._fast_matvec(), []
    monkeypatch.setattr(deepseek, "_matvec", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(deepseek, "MATVEC_MIN_NUMEL", 0)  # tiny weights would take F.linear
    fast = [generate(m, [p], sp)[0] for p in prompts] + generate(m, prompts, sp)
    assert calls  # batch-1 decode steps took the kernel
    monkeypatch.setattr(deepseek, "FAST_MATVEC", False)
    slow = [generate(m, [p], sp)[0] for p in prompts] + generate(m, prompts, sp)
    assert fast == slow
    # and cached one-token logits agree with a full forward (padded-v prefill + absorbed decode)
    ids = torch.tensor([prompts[0] + fast[0][:4]])
    with torch.inference_mode():
        full = m(ids)[:, -1]
        cache = m.new_cache(1, 32)
        m(ids[:, :-1], cache=cache)
        monkeypatch.setattr(deepseek, "FAST_MATVEC", True)
        step = m(ids[:, -1:], cache=cache)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_absorbed_weights_follow_weight_updates() -> None:
    torch.manual_seed(0)
    m = DeepseekV3(ModelArgs(**TINY)).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])

    def step_vs_full() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            cache = m.new_cache(1, 16)
            m(ids[:, :-1], cache=cache)
            return m(ids[:, -1:], cache=cache)[:, -1], m(ids)[:, -1]

    a, full_a = step_vs_full()
    torch.testing.assert_close(a, full_a, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # e.g. an optimizer step or load_state_dict between generations
        for layer in m.model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(1.5)
    b, full_b = step_vs_full()
    assert not torch.allclose(full_a, full_b, atol=1e-3)  # the change matters ...
    torch.testing.assert_close(b, full_b, rtol=1e-4, atol=1e-4)  # ... and the cached copies saw it
