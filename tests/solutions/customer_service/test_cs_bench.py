"""`verticals customer-service bench`: per-turn latency and batched throughput on real SGD dev turns."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "customer_service"


def test_bench_reports_latency_and_throughput(tiny_home: Path) -> None:
    from solutions.customer_service.cli import app

    r = CliRunner().invoke(app, ["bench", "--data-root", str(SHARED), "--dialogues", "1", "--json", "--compare"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["turns"] >= 1
    assert 0 < res["latency_ms_p50"] <= res["latency_ms_p95"]
    assert res["turns_per_s_single"] > 0 and res["turns_per_s_batched"] > 0
    assert res["batched_over_single"] > 0
    assert 0 < res["cpu_latency_ms_p50"] <= res["cpu_latency_ms_p95"] and res["turns_per_cpu_s_batched"] > 0
    # --compare: the same heads timed with the other encoder precision, with 64 pairs per call and with
    # the heads stepping one turn per call
    assert res["encoder"] in ("fp32", "int8")
    other = "encoder_int8" if res["encoder"] == "fp32" else "encoder_fp32"
    rates = res["compare_turns_per_s_batched"]
    # bf16 matmuls (CPUs with native bf16): also timed with fp32 matmuls, same weights
    assert res["matmuls"] in ("fp32", "bf16", "int8")
    extra = {"fp32_matmuls"} if res["matmuls"] == "bf16" else set()
    extra |= {"heads_one_turn_per_call"}
    assert set(rates) == {"this", other, "64_pairs_per_call"} | extra and all(v > 0 for v in rates.values())
    assert set(res["compare_ratio_this_over"]) == {other, "64_pairs_per_call"} | extra
