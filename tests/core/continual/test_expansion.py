from __future__ import annotations

import pytest
import torch
from torch import nn

from core.continual import expansion
from core.errors import ConfigError
from core.model.deepseek import DeepseekV3, ModelArgs
from tests.core.continual.loop import HookLoop


def tiny() -> DeepseekV3:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                     num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                     first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8, max_position_embeddings=64)
    return DeepseekV3(args)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_expansion_trains_only_new_experts_and_keeps_old_routing_bit_identical() -> None:
    model = tiny()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(ids)
    old_state = {k: v.clone() for k, v in model.state_dict().items()}

    new = expansion.expand_model(model, 2)
    moe = expansion.moe_layers(model)[0]
    assert len(moe.experts) == 6 and moe.gate.n_experts == 6 and moe.gate.weight.shape == (6, 32)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in new}

    task_b = [torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    HookLoop(model, lm_loss, lr=0.05).fit(task_b, epochs=2)
    model.eval()
    with torch.no_grad(), expansion.experts_limit(model, 4):
        assert torch.equal(model(ids), before)  # old task, old experts: bit-identical
    with torch.no_grad():
        after_all = model(ids)
    assert not torch.equal(after_all, before)  # the new experts are in use when allowed
    for k, v in old_state.items():  # the frozen tensors did not move
        if k.endswith("gate.weight"):
            assert torch.equal(model.state_dict()[k.replace("gate.weight", "gate.weight_old")], v)
        elif "e_score_correction_bias" not in k:
            assert torch.equal(model.state_dict()[k], v), k


def test_expanding_twice_freezes_the_first_expansion() -> None:
    model = tiny()
    expansion.expand_model(model, 2)
    second = expansion.expand_model(model, 2)
    moe = expansion.moe_layers(model)[0]
    assert len(moe.experts) == 8 and moe.gate.weight_old.shape[0] == 6
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in second}


def test_bad_expansions_are_clear_errors() -> None:
    with pytest.raises(ConfigError):
        expansion.expand_model(nn.Linear(2, 2), 1)
    model = tiny()
    with pytest.raises(ConfigError):
        expansion.expand_model(model, 0)
    expansion.expand_model(model, 1)
    with pytest.raises(ConfigError), expansion.experts_limit(model, 1):
        pass
