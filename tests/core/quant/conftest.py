"""Tiny models and data for the quantized-runtime tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.model.deepseek import DeepseekV3, ModelArgs

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=256)


@pytest.fixture
def quant_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated VERTICALS_HOME (the C kernels compile into its cache once per test session dir)."""
    from core.settings import reset_settings

    home = tmp_path / "home"
    monkeypatch.setenv("VERTICALS_HOME", str(home))
    reset_settings()
    yield home
    reset_settings()


@pytest.fixture
def tiny_model() -> DeepseekV3:
    torch.manual_seed(0)
    return DeepseekV3(ModelArgs(**TINY)).eval()


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY["vocab_size"], (2, 32), generator=g) for _ in range(3)]
