"""Image encoders: shapes for 2-D and 3-D, projector token budget, modality-aware masking."""

from __future__ import annotations

import pytest
import torch

from core.errors import DataError
from core.model.deepseek import DeepseekV3, ModelArgs
from core.model.vision import (
    VisionEncoder2D,
    VisionEncoder3D,
    VisionProjector,
    build_multimodal_inputs,
    prefix_lm_loss,
)


def test_2d_and_3d_shapes() -> None:
    torch.manual_seed(0)
    enc = VisionEncoder2D(1, 32, stem_channels=(8, 16), depth=1, heads=2)
    out = enc(torch.randn(2, 1, 64, 48))
    assert out.grid == (8, 6) and out.tokens.shape == (2, 48, 32) and out.pooled.shape == (2, 32)
    enc3 = VisionEncoder3D(1, 32, stem_channels=(8,), depth=1, heads=2)
    out3 = enc3(torch.randn(1, 1, 16, 16, 16))
    assert out3.tokens.shape == (1, 64, 32)
    with pytest.raises(DataError):
        enc(torch.randn(2, 3, 64, 64))  # wrong channels
    with pytest.raises(DataError):
        enc(torch.randn(1, 1, 4, 4))  # smaller than the stride


def test_projector_and_modality_mask() -> None:
    torch.manual_seed(0)
    lm = DeepseekV3(ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)).eval()
    tokens = torch.randn(2, 100, 24)
    prefix = VisionProjector(24, 32, max_tokens=6)(tokens)
    assert prefix.shape == (2, 6, 32)
    ids = torch.randint(0, 50, (2, 9))
    has = torch.tensor([True, False])
    embeds, mask, labels = build_multimodal_inputs(lm, prefix, has, ids)
    assert embeds.shape == (2, 15, 32) and mask[1, :6].sum() == 0 and mask[0, :6].all()
    assert (labels[:, :6] == -100).all() and torch.equal(labels[:, 6:], ids)
    with torch.no_grad():
        text_only = lm(inputs_embeds=embeds, attention_mask=mask)[1, 6:]
        plain = lm(ids[1:])[0]
    assert torch.allclose(text_only, plain, atol=1e-5)  # image slots are skipped for text-only rows
    loss = prefix_lm_loss(lm, prefix, has, ids)
    loss.backward()
    assert torch.isfinite(loss)
