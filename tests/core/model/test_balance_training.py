"""Aux-loss-free balancing in training: the bias-update window and schedule, the train-mix balance blocks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.model.data import iter_documents, pack
from core.model.deepseek import DeepseekV3, ModelArgs
from core.model.default import MoEBalanceHook, TrainConfig, prepare_data, train_mix_blocks
from core.model.tokenizer import Tokenizer

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
            bias_update_speed=0.01)


def test_bias_updates_every_window_steps_on_the_summed_load() -> None:
    m = DeepseekV3(ModelArgs(**TINY))
    (g,) = m.gates()
    hook = MoEBalanceHook(window=3)
    trainer = SimpleNamespace(model=m, global_step=0, total_steps=100)
    step_loads = [torch.tensor([5.0, 0, 0, 3]), torch.tensor([0.0, 1, 0, 3]), torch.tensor([0.0, 0, 1, 3])]
    for i, load in enumerate(step_loads):
        g.load += load  # what the forward passes of one optimizer step count
        trainer.global_step = i + 1
        hook.after_step(trainer, 0.0)
        if i < 2:
            assert torch.equal(g.e_score_correction_bias, torch.zeros(4))  # still inside the window
    total = sum(step_loads)  # [5, 1, 1, 9], mean 4: experts 0 and 3 above, 1 and 2 below
    assert torch.allclose(g.e_score_correction_bias, 0.01 * torch.sign(total.mean() - total))
    assert g.load.sum() == 0  # counters reset for the next window
    with pytest.raises(ValueError):
        MoEBalanceHook(window=0)


def test_cosine_gamma_schedule_and_disabled_hook() -> None:
    hook = MoEBalanceHook(schedule="cosine", min_ratio=0.1)
    assert hook.gamma(0.01, 0, 200) == pytest.approx(0.01)
    assert hook.gamma(0.01, 199, 200) == pytest.approx(0.001)
    assert 0.001 < hook.gamma(0.01, 100, 200) < 0.01
    assert MoEBalanceHook().gamma(0.01, 150, 200) == 0.01  # constant (the default)
    with pytest.raises(ValueError):
        MoEBalanceHook(schedule="linear")
    m = DeepseekV3(ModelArgs(**TINY))
    (g,) = m.gates()
    g.load += torch.tensor([9.0, 0, 0, 0])
    MoEBalanceHook(enabled=False).after_step(SimpleNamespace(model=m, global_step=1, total_steps=10), 0.0)
    assert torch.equal(g.e_score_correction_bias, torch.zeros(4)) and g.load.sum() == 0


def test_train_mix_blocks_sample_the_training_blocks_and_leave_training_alone(shared_data, tmp_home) -> None:
    corpora = ["iu_xray", "medpix_captions"]
    cfg = TrainConfig(corpora=corpora, docs_per_corpus=150, tokenizer_docs_per_corpus=150, eval_blocks=8,
                      seq_len=32, model={**TINY, "vocab_size": 600})
    tok = Tokenizer.train(iter_documents(shared_data, corpora, "train", 150), vocab_size=600)
    _, train, dev = prepare_data(cfg, shared_data, tok)
    everything = pack(tok.encode_batch(list(iter_documents(shared_data, corpora, "train", 150))), 32,
                      tok.bos_id, tok.eos_id)
    assert torch.equal(train, everything)  # every training block still trains
    mix = train_mix_blocks(cfg, train)
    rows = {tuple(r) for r in train.tolist()}
    assert len(mix) == 8 and all(tuple(r) in rows for r in mix.tolist()) and len(dev) == 8
    assert torch.equal(mix, train_mix_blocks(cfg, train))  # seeded
    assert not torch.equal(mix, train_mix_blocks(TrainConfig(seed=5, eval_blocks=8), train))
