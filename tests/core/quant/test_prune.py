from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.model.deepseek import DeepseekV3
from core.quant.distill import DistillLoss, perplexity
from core.quant.prune import plan_pruning, prune_model


def test_prune_removes_the_planned_fraction(tiny_model, calib_batches) -> None:
    student, plan = prune_model(tiny_model, calib_batches, 0.3, progress=False)
    n_t = sum(p.numel() for p in tiny_model.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert 1 - n_s / n_t >= 0.3 and abs((1 - n_s / n_t) - plan.sparsity) < 1e-9
    assert isinstance(student, DeepseekV3)
    x = calib_batches[0]
    assert student(x).shape == tiny_model(x).shape
    assert perplexity(student, calib_batches) < 10 * perplexity(tiny_model, calib_batches)


def test_pruning_ffn_only_keeps_important_channels(tiny_model, calib_batches) -> None:
    student, plan = prune_model(tiny_model, calib_batches, 0.1, parts=("ffn",), progress=False)
    assert student.args.num_attention_heads == tiny_model.args.num_attention_heads
    assert student.args.intermediate_size < tiny_model.args.intermediate_size


def test_impossible_sparsity_is_clear(tiny_model) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        plan_pruning(tiny_model.args, 0.95)
    with pytest.raises(ConfigError, match="unknown prune parts"):
        plan_pruning(tiny_model.args, 0.3, parts=("layers",))


def test_distillation_loss_drops_with_training(tiny_model, calib_batches) -> None:
    student, _ = prune_model(tiny_model, calib_batches, 0.3, progress=False)
    loss = DistillLoss(tiny_model, hidden_weight=0.1)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    first = None
    for _ in range(6):
        student.train()
        v = loss(student, calib_batches[0])
        first = float(v) if first is None else first
        opt.zero_grad()
        v.backward()
        opt.step()
    assert float(loss(student, calib_batches[0])) < first
