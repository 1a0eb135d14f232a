"""The whole bench in its quick form (trains the small bench LM: minutes on 2 cores)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_bench_quant_quick_run(quant_home, shared_data) -> None:
    from core.quant.bench import run_bench

    res = run_bench(quick=True, distill_steps=5, decode_tokens=4, lm="bench")
    assert res["bandwidth_gb_s"] > 0
    for name in ("fp32", "int8", "int4", "mixed", "torch_dynamic_int8"):
        f = res["formats"][name]
        assert f["ppl"] > 1 and f["tokens_per_s"] > 0 and f["weight_bytes"] > 0 and 0 < f["bandwidth_fraction"]
    assert res["formats"]["int4"]["weight_bytes_vs_fp32"] < 0.2
    if res["kernels"]["backend"] == "c":  # perplexity through the int8-activation decode kernels
        assert res["formats"]["int4"]["ppl_int8_act"] > 1
    assert res["engine"]["cache_hit"] and res["engine"]["p95_ttft_s"] > 0
    assert res["pruning"]["sparsity"] >= 0.3
