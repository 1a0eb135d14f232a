"""`verticals capacity`: real workers, real main task, counts checked in the solution's tables."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner


def test_capacity_measures_medical_ingest_and_skips_missing_models(tmp_home: Path) -> None:
    from core.capacity import run_capacity

    res = run_capacity(["medical_imaging", "industrial_qa"], jobs=4, latency_jobs=2)
    mi = res["medical_imaging"]
    assert mi["task"] == "medical_imaging.ingest" and mi["model"] == "none"
    assert mi["submitted"] == 1 + 2 + 4 and mi["completed"] == mi["submitted"]
    assert mi["failed"] == 0 and mi["lost"] == 0
    assert mi["jobs_per_s"] > 0 and 0 < mi["latency_ms_p50"] <= mi["latency_ms_p95"]
    # no detector trained in this home: skipped with an actionable reason, not measured on nothing
    assert "no trained detector" in res["industrial_qa"]["skipped"]
    assert "--tiny-models" in res["industrial_qa"]["skipped"]
    assert "no trained reporter" in res["medical_imaging.draft"]["skipped"]


def test_capacity_cli_rejects_unknown_solution(tmp_home: Path) -> None:
    from core.cli import app

    r = CliRunner().invoke(app, ["capacity", "-s", "bakery", "--json"])
    assert r.exit_code != 0
    assert "unknown solution" in r.output

