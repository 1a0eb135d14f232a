"""``bench-quant``: every figure of the quantized runtime, measured side by side in one run.

1. Memory copy bandwidth of this machine (a 256 MiB tensor copy; read + write bytes per second).
2. Kernel choice: microseconds of each candidate matmul path at a decode shape, and the C kernel's
   thread count (1 vs all), picked by measurement and used for the rest of the run.
3. Perplexity on held-out text of the default core LM (trained first when absent) in fp32, int8,
   int4 (group 64, GPTQ), mixed, and torch's dynamic int8 (``quantize_dynamic``) as the peer.
   int8/int4/mixed also through the decode kernels (``ppl_int8_act``: activations quantized to int8).
4. Batch-1 decode tokens/s on a ~100M-parameter DeepSeek-V3 config (random weights: speed only),
   each format timed in interleaved rounds; bandwidth fraction = tokens/s x bytes of weights read per
   token (routed experts counted at top_k / n_routed) / copy bandwidth.
5. Pruning 30% of the default LM's parameters + distillation: perplexity before / after vs unpruned.
6. Engine: 16 concurrent requests vs one alone: total tokens/s ratio, p95 time to first token.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.model.deepseek import DeepseekV3, LatentCache, ModelArgs, MoE
from core.quant import kernels
from core.quant.distill import perplexity
from core.quant.linear import QuantLinear, quantizable_linears
from core.quant.pipeline import quantize_model

log = logging.getLogger(__name__)

# ~100M parameters (about 60M active per token): large enough that fp32 decode is memory-bound.
SPEED_CONFIG = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
                    num_hidden_layers=6, num_attention_heads=8, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                    v_head_dim=64, first_k_dense_replace=1, max_position_embeddings=1024)
QUICK_SPEED_CONFIG = dict(SPEED_CONFIG, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_hidden_layers=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                          v_head_dim=32, vocab_size=2048)


def _log(msg: str) -> None:
    print(f"[bench-quant] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------------
def copy_bandwidth_gb_s(mib: int = 256, reps: int = 5) -> float:
    """Best-of-``reps`` bytes read + written per second by a large tensor copy (STREAM 'copy' convention)."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def choose_kernel_threads(quick: bool) -> dict[str, Any]:
    """Time the decode-shaped matmul paths with 1 thread and with all; keep the faster C-kernel setting."""
    size = 1024 if quick else 2048
    out: dict[str, Any] = {"shape": [size, size], "rows": 1}
    all_threads = torch.get_num_threads()
    per: dict[int, dict[str, float]] = {}
    for n in sorted({1, all_threads}):
        kernels.set_threads(n)
        per[n] = kernels.microbench(N=size, K=size, rows=1, reps=5 if quick else 20)
    kernels.set_threads(None)
    out["us_per_call"] = {f"threads_{n}": v for n, v in per.items()}
    if kernels.c_library() is not None:
        best = min(per, key=lambda n: per[n]["int8_c_kernel"] + per[n]["int4_c_kernel"])
        kernels.set_threads(best)
        out["c_kernel_threads"] = best
    out["backend"] = kernels.active_backend()
    out["c_kernel_error"] = kernels.c_library_error()
    return out


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------
def dynamic_int8(model: nn.Module) -> nn.Module:
    """torch's own dynamic int8 (fbgemm) on the same Linears we quantize (kv_b_proj is read as a matrix)."""
    import warnings

    names = set(quantizable_linears(model))
    spec = {n: torch.ao.quantization.default_dynamic_qconfig for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


def make_formats(model: DeepseekV3, calib: list[torch.Tensor], *, method: str = "gptq",
                 size_budget: float = 0.18, clip_search: bool = True, progress: bool = False
                 ) -> dict[str, tuple[nn.Module, dict]]:
    out: dict[str, tuple[nn.Module, dict]] = {"fp32": (model, {})}
    for name, bits in (("int8", 8), ("int4", 4), ("mixed", "mixed")):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        rep = quantize_model(m, bits, group_size=64, method=method, calib_batches=calib,  # type: ignore[arg-type]
                             size_budget=size_budget, clip_search=clip_search, progress=progress)
        out[name] = (m, {"linear_bytes_ratio": rep.linear_bytes_ratio, "quantize_s": time.perf_counter() - t,
                         "method": rep.method, "int8_layers": sum(1 for p in rep.plan.values() if p["bits"] == 8),
                         "layers": len(rep.plan)})
    out["torch_dynamic_int8"] = (dynamic_int8(model), {})
    return out


def _module_bytes(m: nn.Module) -> int:
    if isinstance(m, QuantLinear):
        return m.stored_bytes()
    if isinstance(m, nn.Linear):
        return sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    if type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):  # torch dynamic quantized Linear
        w, b = m._packed_params._weight_bias()
        return w.numel() * w.element_size() + (0 if b is None else b.numel() * 4)
    return 0


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(all Linear weight bytes incl. scales, bytes read per decoded token: routed experts x top_k/n)."""
    total = per_token = 0
    expert_mods: set[int] = set()
    frac: dict[int, float] = {}
    for m in model.modules():
        if isinstance(m, MoE):
            f = m.gate.top_k / len(m.experts)
            for e in m.experts:
                for sub in e.modules():
                    expert_mods.add(id(sub))
                    frac[id(sub)] = f
    for m in model.modules():
        b = _module_bytes(m)
        total += b
        per_token += b * frac.get(id(m), 1.0)
    return total, int(per_token)


@torch.inference_mode()
def decode_tokens_per_s(models: dict[str, nn.Module], args: ModelArgs, *, prompt_len: int = 16, steps: int = 24,
                        rounds: int = 3, threads: int | None = None) -> dict[str, float]:
    """Batch-1 greedy decode through the latent cache, formats interleaved round by round.

    ``threads`` applies to torch's own ops *and* the C kernel for every format alike. It matters: with
    torch at 2 threads and the kernel at 1 (the old setup), every small torch op of an int8 step
    (absorbed attention, norms, routing) paid an OpenMP team barrier, and on a shared CPU a 2-thread
    team waits for its descheduled partner, which made int8 decode look slower than fp32."""
    old_torch, old_kernel = torch.get_num_threads(), kernels._threads
    if threads:
        torch.set_num_threads(threads)
        kernels.set_threads(threads)
    try:
        return _decode_tokens_per_s(models, args, prompt_len=prompt_len, steps=steps, rounds=rounds)
    finally:
        torch.set_num_threads(old_torch)
        kernels.set_threads(old_kernel)


def _decode_tokens_per_s(models: dict[str, nn.Module], args: ModelArgs, *, prompt_len: int, steps: int,
                         rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (1, prompt_len), generator=g)
    times: dict[str, list[float]] = {k: [] for k in models}
    width = args.kv_lora_rank + args.qk_rope_head_dim
    for r in range(rounds + 1):
        for name, m in models.items():
            cache = LatentCache(args.num_hidden_layers, 1, prompt_len + steps + 1, width, dtype=torch.float32,
                                device="cpu")
            tok = m(prompt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(steps):
                tok = m(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
            if r > 0:  # round 0 warms caches and lazy initialisation
                times[name].append((time.perf_counter() - t) / steps)
    return {k: 1.0 / statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run_bench(*, quick: bool = False, distill_steps: int = 300, decode_tokens: int = 24,
              lm: str = "default", threads: int | None = None) -> dict[str, Any]:
    """``threads``: torch + kernel threads for the decode timing (None = the count the kernel
    measurement picked, 1 or all)."""
    from core.quant.data import load_tokenizer
    from core.quant.models import load_model, model_batches

    t_start = time.perf_counter()
    torch.manual_seed(0)
    res: dict[str, Any] = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    _log("measuring copy bandwidth")
    bw = copy_bandwidth_gb_s(64 if quick else 256)
    res["bandwidth_gb_s"] = bw
    _log("measuring kernel paths")
    res["kernels"] = choose_kernel_threads(quick)

    # Quality: the default LM on held-out text.
    from core.quant.lm_data import default_lm_with_texts

    lm_dir, train_text, heldout_text = default_lm_with_texts(quick=quick, lm=lm)
    res["lm"] = {"dir": str(lm_dir), "which": lm}
    lm = load_model(lm_dir)
    res["lm"]["params"] = sum(p.numel() for p in lm.parameters())
    seq = 128
    calib = model_batches(lm_dir, lm, train_text, seq_len=seq, batch_size=4, max_tokens=4096 if quick else 16384)
    held = model_batches(lm_dir, lm, heldout_text, seq_len=seq, batch_size=4, max_tokens=4096 if quick else 32768)
    _log(f"default LM {lm_dir}: {sum(p.numel() for p in lm.parameters()):,} params; quantizing 4 formats")
    q_models = make_formats(lm, calib, progress=True)
    formats: dict[str, dict[str, Any]] = {}
    for name, (m, info) in q_models.items():
        formats[name] = {"ppl": perplexity(m, held), **info}
        _log(f"{name}: ppl {formats[name]['ppl']:.4f}")
    base_ppl = formats["fp32"]["ppl"]
    for v in formats.values():
        v["ppl_vs_fp32"] = v["ppl"] / base_ppl - 1
    # "ppl" above multiplies fp32 activations (dequant + BLAS for many rows). Decode runs the integer-dot
    # kernels, which quantize each activation row to int8 per block: the same perplexity through them
    # (row threshold lifted) is what that costs in quality.
    if kernels.c_library() is not None and kernels.activation_quant():
        kernels.set_row_threshold(1 << 30)
        try:
            for name in ("int8", "int4", "mixed"):
                p = perplexity(q_models[name][0], held)
                formats[name]["ppl_int8_act"] = p
                formats[name]["ppl_int8_act_vs_fp32"] = p / base_ppl - 1
                _log(f"{name} through the int8-activation kernels: ppl {p:.4f}")
        finally:
            kernels.set_row_threshold(None)

    # Speed: the ~100M config, batch-1 decode.
    args = ModelArgs(**(QUICK_SPEED_CONFIG if quick else SPEED_CONFIG))
    speed_fp32 = DeepseekV3(args).eval()
    n_params = sum(p.numel() for p in speed_fp32.parameters())
    _log(f"speed model: {n_params:,} params; quantizing")
    g = torch.Generator().manual_seed(1)
    speed_calib = [torch.randint(0, args.vocab_size, (1, 64), generator=g)]
    s_models = make_formats(speed_fp32, speed_calib, method="rtn", clip_search=False)  # speed only
    dec_threads = threads or res["kernels"].get("c_kernel_threads") or torch.get_num_threads()
    res["decode_threads"] = dec_threads
    tps = decode_tokens_per_s({k: v[0] for k, v in s_models.items()}, args, steps=8 if quick else decode_tokens,
                              rounds=1 if quick else 3, threads=dec_threads)
    for name, (m, _) in s_models.items():
        total, per_token = weight_bytes(m)
        f = formats.setdefault(name, {})
        f.update({"tokens_per_s": tps[name], "weight_bytes": total, "bytes_read_per_token": per_token,
                  "bandwidth_fraction": tps[name] * per_token / (bw * 1e9),
                  "speedup_vs_fp32": tps[name] / tps["fp32"],
                  "weight_bytes_vs_fp32": total / weight_bytes(s_models["fp32"][0])[0]})
    res["speed_model"] = {"params": n_params, "config": {k: v for k, v in (QUICK_SPEED_CONFIG if quick
                                                                         else SPEED_CONFIG).items()}}
    res["formats"] = formats
    del s_models, speed_fp32

    # Pruning + distillation on the default LM.
    res["pruning"] = prune_figures(lm, calib, held, lm_dir, train_text, steps=20 if quick else distill_steps,
                                   base_ppl=base_ppl)
    # Engine batching.
    tok = load_tokenizer(lm_dir)
    res["engine"] = engine_figures(lm, tok, heldout_text, n_requests=4 if quick else 16,
                                   new_tokens=8 if quick else 32)
    res["targets"] = {
        "int8_ppl_within_0.5pct": formats["int8"]["ppl_vs_fp32"] <= 0.005,
        "int8_decode_ge_1.6x": formats["int8"]["speedup_vs_fp32"] >= 1.6,
        "int4_ppl_within_3pct": formats["int4"]["ppl_vs_fp32"] <= 0.03,
        "int8_ppl_int8_act_within_0.5pct": formats["int8"].get("ppl_int8_act_vs_fp32", 0.0) <= 0.005,
        "int4_ppl_int8_act_within_3pct": formats["int4"].get("ppl_int8_act_vs_fp32", 0.0) <= 0.03,
        "int4_decode_ge_2.2x": formats["int4"]["speedup_vs_fp32"] >= 2.2,
        "int4_bytes_le_0.16x": formats["int4"]["weight_bytes_vs_fp32"] <= 0.16,
        "prune_ppl_within_5pct": res["pruning"]["ppl_vs_unpruned_after_distill"] <= 0.05,
        "engine_ge_4x": res["engine"]["speedup"] >= 4.0,
    }
    res["seconds"] = time.perf_counter() - t_start
    return res


def prune_figures(lm: DeepseekV3, calib: list[torch.Tensor], held: list[torch.Tensor], lm_dir: Path,
                  train_text: Path, *, steps: int, base_ppl: float, sparsity: float = 0.3) -> dict[str, Any]:
    from core.quant.distill import distill
    from core.quant.models import model_batches
    from core.quant.prune import prune_model

    _log(f"pruning {sparsity:.0%} + {steps} distillation steps")
    train = model_batches(lm_dir, lm, train_text, seq_len=128, batch_size=8, max_tokens=262144)
    student, plan = prune_model(lm, calib[:8], sparsity)
    before = perplexity(student, held)
    t = time.perf_counter()
    d = distill(student, lm, train, steps=steps) if steps else {}
    after = perplexity(student, held)
    return {"sparsity": plan.sparsity, "params_before": plan.params_before, "params_after": plan.params_after,
            "keep_fraction": plan.keep_fraction, "ppl_unpruned": base_ppl, "ppl_pruned_before_distill": before,
            "ppl_after_distill": after, "ppl_vs_unpruned_after_distill": after / base_ppl - 1,
            "distill_steps": steps, "distill_s": time.perf_counter() - t, "distill": d}


def engine_figures(lm: DeepseekV3, tokenizer: Any, heldout_text: Path, *, n_requests: int = 16,
                   new_tokens: int = 32) -> dict[str, Any]:
    from core.model.generate import SamplingParams
    from core.quant.data import read_texts
    from core.quant.engine import Engine

    _log(f"engine: 1 vs {n_requests} concurrent requests")
    texts = read_texts(heldout_text)
    prompts = []
    for t in texts:
        ids = list(tokenizer.encode(t))[:24]
        if len(ids) >= 8:
            prompts.append(ids)
        if len(prompts) > n_requests:
            break
    sp = SamplingParams(max_new_tokens=new_tokens, eos_token_id=None)
    with Engine(lm, max_batch=n_requests, eos_token_id=None) as eng:
        t = time.perf_counter()
        single = eng.submit(prompts[-1], sp)
        single.result(600)
        single_tps = new_tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        hs = [eng.submit(p, sp) for p in prompts[:n_requests]]
        outs = [h.result(600) for h in hs]
        wall = time.perf_counter() - t
        hit = eng.submit(prompts[0], sp)
        hit.result(60)
    total = sum(len(o) for o in outs)
    ttft = sorted(h.ttft_s for h in hs if h.ttft_s is not None)
    p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]
    return {"single_tokens_per_s": single_tps, "concurrent_tokens_per_s": total / wall,
            "speedup": total / wall / single_tps, "requests": n_requests, "new_tokens": new_tokens,
            "p50_ttft_s": statistics.median(ttft), "p95_ttft_s": p95, "single_ttft_s": single.ttft_s,
            "max_rows_in_a_step": eng.max_rows_seen, "cache_hit_latency_s": hit.latency_s,
            "cache_hit": hit.from_cache}
