"""Decode-speed benchmark: ours vs transformers on the same weights and prompt, measured in one run.

Both sides decode greedily at batch 1 in fp32 on the CPU. transformers keeps a latent cache too, but
re-expands every cached latent through ``kv_b_proj`` into per-head keys/values at each step
(O(context x heads x head_dim) work per layer per token); ours attends in latent space ("absorb"),
so the per-token cost stays close to the active parameter count.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch

from core.model.deepseek import DeepseekV3, ModelArgs
from core.model.generate import (
    SamplingParams,
    SpeculativeStats,
    generate,
    kv_cache_bytes_per_token_per_layer,
    speculative_generate,
)
from core.model.hf import to_transformers

log = logging.getLogger(__name__)

# ~69M parameters (~33M active per token): 8 layers, 8 routed experts (top-2) + 1 shared.
BENCH_CONFIG: dict[str, Any] = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=8, kv_lora_rank=256, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
    max_position_embeddings=2048, initializer_range=0.02)


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _timed2(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). With 1 thread, CPU time is the steadier figure on a
    shared machine: it does not count the time other processes held the core."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


@torch.inference_mode()
def bench_decode(prompt_len: int = 512, new_tokens: int = 64, repeats: int = 2, seed: int = 0,
                 config: dict[str, Any] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Tokens/s of ours vs transformers (best of ``repeats``, alternating), plus KV-cache bytes.
    ``threads`` sets torch's intra-op threads for both sides (1 avoids OpenMP stalls on a busy VM)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = DeepseekV3(ModelArgs(**(config or BENCH_CONFIG))).eval()
    with tempfile.TemporaryDirectory() as d:
        ref = to_transformers(model, d, attn_implementation="sdpa")  # their fastest CPU path
    ref.generation_config.eos_token_id = None
    prompt = torch.randint(0, model.args.vocab_size, (1, prompt_len))
    sp = SamplingParams(max_new_tokens=new_tokens)

    def ours() -> list[int]:
        return generate(model, [prompt[0].tolist()], sp)[0]

    def theirs() -> list[int]:
        out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    same = ours() == theirs()  # also warms both up
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(_timed2(ours))
        t_ref.append(_timed2(theirs))
    ours_tps, ref_tps = new_tokens / min(t[0] for t in t_ours), new_tokens / min(t[0] for t in t_ref)
    ours_cpu, ref_cpu = min(t[1] for t in t_ours), min(t[1] for t in t_ref)
    kv = kv_cache_bytes_per_token_per_layer(model, 4)
    return {"params": model.num_parameters(), "active_params": model.num_parameters(active=True),
            "prompt_tokens": prompt_len, "new_tokens": new_tokens, "batch": 1, "dtype": "float32",
            "threads": torch.get_num_threads(), "ours_tokens_per_s": round(ours_tps, 2),
            "transformers_tokens_per_s": round(ref_tps, 2), "ratio": round(ours_tps / ref_tps, 2),
            "ours_cpu_s": round(ours_cpu, 3), "transformers_cpu_s": round(ref_cpu, 3),
            "ratio_cpu_time": round(ref_cpu / ours_cpu, 2),
            "same_greedy_tokens": same, "kv_cache_bytes_per_token_per_layer": kv["ours"],
            "mha_kv_cache_bytes_per_token_per_layer": kv["standard_mha"],
            "kv_cache_reduction": round(kv["standard_mha"] / kv["ours"], 2)}


@torch.inference_mode()
def bench_speculative(model: DeepseekV3, prompts: list[list[int]], new_tokens: int = 64, repeats: int = 2,
                      eos_token_id: int | None = None, num_draft: int = 3) -> dict[str, Any]:
    """MTP self-speculative (``num_draft`` chained drafts per verify) vs plain greedy on a trained model:
    speed ratio and identical output."""
    plain = [generate(model, [p], SamplingParams(max_new_tokens=new_tokens, eos_token_id=eos_token_id))[0]
             for p in prompts]
    stats = SpeculativeStats()
    spec = [speculative_generate(model, p, new_tokens, eos_token_id, stats, num_draft) for p in prompts]
    t_plain, t_spec = [], []
    for _ in range(repeats):
        t_plain.append(_timed2(lambda: [generate(model, [p], SamplingParams(max_new_tokens=new_tokens,
                                                                            eos_token_id=eos_token_id))
                                        for p in prompts]))
        t_spec.append(_timed2(lambda: [speculative_generate(model, p, new_tokens, eos_token_id, num_draft=num_draft)
                                       for p in prompts]))
    n = sum(len(x) for x in plain)
    wp, ws = min(t[0] for t in t_plain), min(t[0] for t in t_spec)
    cp, cs = min(t[1] for t in t_plain), min(t[1] for t in t_spec)
    return {"prompts": len(prompts), "tokens": n, "identical_output": plain == spec,
            "num_draft": num_draft, "acceptance": round(stats.acceptance, 3),
            "acceptance_all_drafts": round(stats.acceptance_all, 3),
            "tokens_per_main_forward": round(n / stats.main_forwards, 2), "greedy_tokens_per_s": round(n / wp, 2),
            "speculative_tokens_per_s": round(n / ws, 2), "speedup": round(wp / ws, 2),
            "speedup_cpu_time": round(cp / cs, 2)}
