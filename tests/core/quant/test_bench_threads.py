"""bench-quant's decode timing runs every format with one thread setting and restores the caller's."""

from __future__ import annotations

import torch

from core.model.deepseek import DeepseekV3, ModelArgs
from core.quant import bench, kernels

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=256)


def test_decode_timing_sets_and_restores_threads(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    args = ModelArgs(**TINY)
    torch.manual_seed(0)
    m = DeepseekV3(args).eval()
    seen: list[tuple[int, int]] = []
    real = bench._decode_tokens_per_s

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        seen.append((torch.get_num_threads(), kernels.kernel_threads()))
        return real(*a, **kw)

    monkeypatch.setattr(bench, "_decode_tokens_per_s", spy)
    before = torch.get_num_threads()
    kernels.set_threads(None)
    out = bench.decode_tokens_per_s({"a": m, "b": m}, args, prompt_len=4, steps=2, rounds=1, threads=1)
    assert seen == [(1, 1)]
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    assert torch.get_num_threads() == before and kernels._threads is None


def test_quant_threads_setting(monkeypatch) -> None:  # noqa: ANN001
    import torch

    from core.quant import kernels
    from core.settings import reset_settings

    monkeypatch.setattr(kernels, "_threads", None)
    monkeypatch.setattr(kernels, "_configured_threads", None)
    monkeypatch.setenv("VERTICALS_QUANT_THREADS", "3")
    reset_settings()
    try:
        assert kernels.kernel_threads() == 3
        monkeypatch.setattr(kernels, "_configured_threads", None)
        monkeypatch.setenv("VERTICALS_QUANT_THREADS", "0")
        reset_settings()
        assert kernels.kernel_threads() == torch.get_num_threads()
        kernels.set_threads(1)
        assert kernels.kernel_threads() == 1
    finally:
        kernels.set_threads(None)
        reset_settings()
