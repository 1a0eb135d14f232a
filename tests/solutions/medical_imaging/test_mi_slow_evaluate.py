"""Full training + dev evaluation through the CLI (slow: minutes on a 2-core CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_evaluate_trains_then_beats_both_baselines(tmp_path: Path, shared_data: Path) -> None:
    env = dict(os.environ, VERTICALS_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "core.cli", "medical-imaging", "evaluate", "--data",
                          str(shared_data / "medical" / "medpix2"), "--split", "dev", "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for base in ("retrieval", "template"):
        for k in ("bleu4", "rouge_l", "chrf", "semantic_similarity"):
            assert res[k] > res["baselines"][base][k], (k, base, res)
    # Regression floors below the measured level (0.954 / 0.802 on 2026-11-24; the CNN alone 0.888 /
    # 0.802, `cnn_only`); the targets (0.98 / 0.85) are NOT reached yet, see
    # solutions/medical_imaging/README.md.
    assert res["modality_accuracy"] >= 0.92
    assert res["region_accuracy"] >= 0.77
    assert res["retrieval_recall_at_5"] > res["retrieval_chance_at_5"]


def test_evaluate_bad_data_is_one_line_error(tmp_path: Path) -> None:
    env = dict(os.environ, VERTICALS_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "core.cli", "medical-imaging", "evaluate", "--data",
                          str(tmp_path / "missing"), "--split", "dev", "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in out.stderr
