"""Aux-loss-free balancing in training: the bias-update window and schedule, the dev-mix balance text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.model.data import iter_documents, pack
from core.model.deepseek import DeepseekV3, ModelArgs
from core.model.default import MoEBalanceHook, TrainConfig, dev_mix_blocks, prepare_data
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


def test_dev_mix_blocks_are_held_out_text_in_the_training_mix(shared_data, tmp_home, monkeypatch) -> None:
    import core.model.default as default

    monkeypatch.setattr(default, "MIX_DOCS_PER_CORPUS", 40)
    corpora = ["iu_xray", "banking77"]
    cfg = TrainConfig(corpora=corpora, docs_per_corpus=150, tokenizer_docs_per_corpus=150, eval_blocks=6,
                      seq_len=32, model={**TINY, "vocab_size": 600})
    tok = Tokenizer.train(iter_documents(shared_data, corpora, "train", 150), vocab_size=600)
    _, train, dev = prepare_data(cfg, shared_data, tok)
    mix = dev_mix_blocks(cfg, shared_data, tok)
    assert mix.shape == (6, 32) and torch.equal(mix, dev_mix_blocks(cfg, shared_data, tok))  # seeded
    # Banking77 (no dev split) contributes training documents the trainer never reads (past the cap)
    trained = set(iter_documents(shared_data, ["banking77"], "train", 150))
    unseen = list(iter_documents(shared_data, ["banking77"], "train", 190))[150:]
    assert len(unseen) == 40 and not trained & set(unseen)
    stream = pack(tok.encode_batch(list(iter_documents(shared_data, ["iu_xray"], "dev", 40)) + unseen), 32,
                  tok.bos_id, tok.eos_id)
    rows = {tuple(r) for r in stream.tolist()}
    assert all(tuple(r) in rows for r in mix.tolist())
    assert any(tuple(r) not in {tuple(d) for d in dev.tolist()} for r in mix.tolist())
    # no cap: every Banking77 document trains, nothing is left to hold out
    assert len(dev_mix_blocks(TrainConfig(corpora=corpora, docs_per_corpus=None, seq_len=32), shared_data, tok)) == 0
