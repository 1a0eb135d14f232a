"""Parity with the reference: the same random weights in ours and in transformers'
``DeepseekV3ForCausalLM`` must give the same logits (fp32) and the same greedy continuation.

Each config exercises a different path: no q compression + plain top-k; q_lora_rank + group-limited
routing + YaRN; two dense layers first + non-interleaved RoPE + a non-zero routing bias.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from core.model.deepseek import DeepseekV3, ModelArgs
from core.model.generate import SamplingParams, generate
from core.model.hf import to_transformers

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
             initializer_range=0.08, max_position_embeddings=256)

PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "no_q_lora_plain_topk": dict(_BASE, q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=1),
    "q_lora_group_limited_yarn": dict(
        _BASE, q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "first2_dense_noninterleaved_bias": dict(
        _BASE, num_hidden_layers=4, q_lora_rank=16, n_group=2, topk_group=1, first_k_dense_replace=2,
        rope_interleave=False, norm_topk_prob=False, routed_scaling_factor=1.5),
}


@torch.inference_mode()
def parity_one(name: str, cfg: dict[str, Any], *, seed: int = 0, prompt_len: int = 16,
               new_tokens: int = 32) -> dict[str, Any]:
    """Compare logits on a random batch and a 32-token greedy continuation for one config."""
    torch.manual_seed(seed)
    ours = DeepseekV3(ModelArgs(**cfg)).eval()
    for g in ours.gates():  # a non-zero routing bias, so the bias path is compared too
        g.e_score_correction_bias.normal_(0.0, 0.05)
    with tempfile.TemporaryDirectory() as d:
        ref = to_transformers(ours, d)
    ids = torch.randint(0, cfg["vocab_size"], (2, prompt_len))
    diff = float((ours(ids) - ref(ids).logits).abs().max())
    prompt = ids[:1]
    ours_tokens = generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=new_tokens))[0]
    ref.generation_config.eos_token_id = None
    ref_out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ref_tokens = ref_out[0, prompt_len:].tolist()
    return {"config": name, "max_abs_logit_diff": diff, "greedy_match": ours_tokens == ref_tokens,
            "greedy_tokens": len(ours_tokens)}


def run_parity(configs: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> dict[str, Any]:
    """All configs; the summary holds the worst diff and whether every greedy continuation matched."""
    rows = [parity_one(n, c, seed=seed) for n, c in (configs or PARITY_CONFIGS).items()]
    return {"max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
            "greedy_match": all(r["greedy_match"] for r in rows),
            "greedy_tokens": rows[0]["greedy_tokens"], "dtype": "float32", "configs": rows}
