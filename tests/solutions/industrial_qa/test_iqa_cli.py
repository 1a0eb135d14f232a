"""CLI: train / inspect / evaluate (tiny configs on a real data slice); one JSON last line; clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = ["--steps", "4", "--size", "64", "--coreset", "64"]


def test_evaluate_prints_one_json_report_with_few_shot(_cli, tiny_mvtec: Path, tmp_path: Path) -> None:  # noqa: ANN001
    r = _cli("evaluate", "--data", str(tiny_mvtec), "--few-shot", "3", "--json", "--speed-images", "8", *TINY, home=tmp_path / "h")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "f1_at_threshold",
                "false_alarm_rate_at_95_recall", "images_per_s", "latency_ms_p95"):
        assert key in report and report[key] is not None, key
    assert report["few_shot"] == 3 and report["n_test"] == 6 + 9 - 3
    assert 0.0 <= report["image_auroc"] <= 1.0 and report["images_per_s"] > 0
    assert "%" in r.stderr  # a progress bar went to stderr


def test_train_then_inspect(_cli, tiny_mvtec: Path, tmp_path: Path) -> None:  # noqa: ANN001
    home = tmp_path / "h"
    r = _cli("train", "--data", str(tiny_mvtec), "--line", "l1", *TINY, home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["version"] == "v0001"
    assert (home / "models" / "industrial_qa" / "l1" / "v0001" / "weights.safetensors").is_file()
    img = sorted((tiny_mvtec / "test" / "crack").iterdir())[0]
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    r = _cli("inspect", str(img), str(bad), "--line", "l1", "--heatmaps", str(tmp_path / "out"), home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert rows[0]["status"] == "done" and rows[0]["decision"] in ("accept", "reject")
    assert (tmp_path / "out" / f"{img.stem}_heatmap.png").is_file()
    assert rows[1]["status"] == "failed" and "not a readable image" in rows[1]["error"]


@pytest.mark.parametrize("args,needle", [
    (["evaluate", "--data", "/definitely/not/here", "--json"], "dataset folder not found"),
    (["inspect", "x.png", "--line", "no-such-line"], "no trained model"),
    (["train", "--data", "/tmp", "--line", "bad line!"], "invalid line name"),
])
def test_user_errors_are_one_line(_cli, args: list[str], needle: str, tmp_path: Path) -> None:  # noqa: ANN001
    r = _cli(*args, home=tmp_path / "h")
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_validate_holds_normals_out_and_never_reads_test(_cli, tiny_mvtec: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    shutil.rmtree(tiny_mvtec / "test")             # validation must not need (or read) the test split
    r = _cli("validate", "--data", str(tiny_mvtec), "--n-val", "6", "--json", *TINY, home=tmp_path / "h")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["n_fit"] == 24 - 6 and report["n_val_normals"] == 6 and report["n_val_defects"] >= 12
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["image_auroc_by_kind"]) <= {"hole", "crack", "finish", "edge", "stain"}
    r = _cli("validate", "--data", str(tiny_mvtec), "--n-val", "20", *TINY, home=tmp_path / "h")
    assert r.returncode == 2 and "too few" in r.stderr
