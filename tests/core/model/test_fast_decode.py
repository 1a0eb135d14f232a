"""Batch-1 decode fast paths: the C fp32 matvec, the fused-attention prefill, the MoE decode branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.model import deepseek
from core.model.deepseek import DeepseekV3, LatentCache, ModelArgs, linear
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


# --- the decode fast path (DeepseekV3._fast_ok -> _layer_step) against the module path -----------------
FAST_CFGS = {
    "plain": {},
    "q_lora+groups+scaling": dict(q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                                  routed_scaling_factor=2.5),
    "yarn+no_interleave": dict(rope_interleave=False, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32,
                                                                    "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _mtp_model(**kw: object) -> DeepseekV3:
    torch.manual_seed(0)
    m = DeepseekV3(ModelArgs(**{**TINY, "num_nextn_predict_layers": 1, **kw})).eval()
    with torch.no_grad():
        for g in m.gates():
            g.e_score_correction_bias.uniform_(-0.05, 0.05)
    return m


def _steps(m: DeepseekV3, ids: torch.Tensor, chunks: list[int]) -> tuple[list[torch.Tensor], LatentCache]:
    with torch.inference_mode():
        cache = m.new_cache(ids.shape[0], ids.shape[1] + 2)
        n = ids.shape[1] - sum(chunks)
        out = [m(ids[:, :n], cache=cache)]  # prefill: module path either way
        for c in chunks:
            out.append(m(ids[:, n:n + c], cache=cache, return_hidden=True).logits)
            n += c
    return out, cache


@pytest.mark.parametrize("name", list(FAST_CFGS))
def test_fast_steps_match_the_module_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _mtp_model(**FAST_CFGS[name])
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    chunks = [1, 2, 1, 3, 4, 1]
    taken = []
    real = deepseek._layer_step
    monkeypatch.setattr(deepseek, "_layer_step", lambda *a: taken.append(1) or real(*a))
    fast, fc = _steps(m, ids, chunks)
    assert len(taken) == len(chunks) * m.args.num_hidden_layers  # every cached step took the fast path
    monkeypatch.setattr(deepseek, "FAST_MATVEC", False)
    slow, sc = _steps(m, ids, chunks)
    assert len(taken) == len(chunks) * m.args.num_hidden_layers  # ... and none with it off
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fc.kv, sc.kv, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(fc.pos, sc.pos) and torch.equal(fc.key_mask, sc.key_mask) and fc.length == sc.length
    # the full forward agrees with the last fast step too
    with torch.inference_mode():
        monkeypatch.setattr(deepseek, "FAST_MATVEC", True)
        torch.testing.assert_close(fast[-1][:, -1], m(ids)[:, -1], rtol=1e-4, atol=1e-4)


def test_fast_mtp_forward_matches_the_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _mtp_model(**FAST_CFGS["q_lora+groups+scaling"])
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            mc = m.new_cache(1, 16, mtp=True)
            h = m(ids, return_hidden=True).hidden
            outs = [m.mtp_forward(0, h[:, :8], ids[:, 1:9], cache=mc)[0]]
            outs += list(m.mtp_forward(0, h[:, 8:10], ids[:, 9:11], cache=mc, logits_to_keep=1))
            outs += list(m.mtp_forward(0, h[:, 10:11], ids[:, 11:12], cache=mc))
            return outs

    fast = run()
    assert fast[1].shape == (1, 1, 97) and fast[2].shape == (1, 2, TINY["hidden_size"])
    monkeypatch.setattr(deepseek, "FAST_MATVEC", False)
    for a, b in zip(fast, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_route_matches_the_gate() -> None:
    torch.manual_seed(3)
    for kw in ({}, dict(n_routed_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5),
               dict(norm_topk_prob=False, num_experts_per_tok=3)):
        g = deepseek.Gate(ModelArgs(**{**TINY, **kw})).eval()
        with torch.no_grad():
            g.weight.normal_()
            g.e_score_correction_bias.uniform_(-0.1, 0.1)
        x = torch.randn(16, TINY["hidden_size"])
        w, idx = g(x)
        s = torch.sigmoid(F.linear(x, g.weight))
        for t in range(16):
            es, ws = deepseek._route(g, s[t].tolist(), (s[t] + g.e_score_correction_bias).tolist())
            assert sorted(es) == sorted(idx[t].tolist())
            got = dict(zip(es, ws, strict=True))
            for e, we in zip(idx[t].tolist(), w[t].tolist(), strict=True):
                assert got[e] == pytest.approx(we, rel=1e-5)


def test_dense_small_expert_path_matches_and_follows_weight_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _mtp_model()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    moe = m.model.layers[1].mlp
    assert deepseek._moe_dense_weights(moe) is not None  # tiny experts: stacked
    dense, _ = _steps(m, ids, [1, 2, 1])
    monkeypatch.setattr(deepseek.MoE, "dense_decode_bytes", 0)
    assert deepseek._moe_dense_weights(moe) is None  # over the limit: expert by expert
    sparse, _ = _steps(m, ids, [1, 2, 1])
    for a, b in zip(dense, sparse, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(deepseek.MoE, "dense_decode_bytes", 4 << 20)
    with torch.no_grad():  # an in-place update (optimizer step, load_state_dict) ...
        for e in moe.experts:
            e.down_proj.weight.mul_(3.0)
    after, _ = _steps(m, ids, [1, 2, 1])
    monkeypatch.setattr(deepseek, "FAST_MATVEC", False)
    ref, _ = _steps(m, ids, [1, 2, 1])
    assert not torch.allclose(after[1], dense[1], atol=1e-4)  # ... changes the output
    for a, b in zip(after, ref, strict=True):  # ... and the stacked copy saw it
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fast_path_steps_aside_for_hooks_padding_and_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _mtp_model()
    taken = []
    real = deepseek._layer_step
    monkeypatch.setattr(deepseek, "_layer_step", lambda *a: taken.append(1) or real(*a))
    seen = []
    h = m.model.layers[1].mlp.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    _steps(m, torch.tensor([[5, 6, 7, 8, 9]]), [1])
    assert seen and not taken  # a hooked module is called as a module
    h.remove()
    _steps(m, torch.tensor([[5, 6, 7, 8, 9]]), [1])
    assert taken  # hook gone: fast again
    taken.clear()
    out = generate(m, [[5, 6, 7], [8]], SamplingParams(max_new_tokens=3))  # left-padded batch
    assert not taken and len(out) == 2
    cache = m.new_cache(1, 8)
    y = m(torch.tensor([[1, 2]]), cache=cache)  # grad mode, eval model: module path (differentiable)
    assert not taken and y.requires_grad


def test_c_attention_scores_match_bmm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps of 1-4 tokens take the C scores (q x latent cache rows) and agree with bmm."""
    _need_kernel()
    m = _mtp_model(**FAST_CFGS["q_lora+groups+scaling"])
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    chunks = [1, 4, 2, 1]
    calls: list[tuple[int, int, int]] = []
    real_lib = deepseek._scores_lib

    class Counting:
        def __init__(self, lib: object) -> None:
            self.lib = lib

        def f32_mm(self, *a: int) -> None:
            calls.append(a[4:7])  # M, N, K
            self.lib.f32_mm(*a)

    monkeypatch.setattr(deepseek, "_scores_lib", lambda: Counting(real_lib()))
    c_out, c_cache = _steps(m, ids, chunks)
    H, width = m.args.num_attention_heads, m.args.kv_lora_rank + m.args.qk_rope_head_dim
    n0 = ids.shape[1] - sum(chunks)
    want = []
    for i, c in enumerate(chunks):
        want += [(H * c, n0 + sum(chunks[:i + 1]), width)] * m.args.num_hidden_layers
    assert calls == want  # every layer of every step: H*T query rows, S cache rows of r + d_rope
    monkeypatch.setattr(deepseek, "SCORES_C_MAX_ROWS", 0)  # bmm everywhere
    b_out, b_cache = _steps(m, ids, chunks)
    assert len(calls) == len(want)
    for a, b in zip(c_out, b_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(c_cache.kv, b_cache.kv, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
