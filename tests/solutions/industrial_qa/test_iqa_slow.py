"""Full-size training and evaluation on the whole magnetic_tile dev data (``-m slow``; minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_full_evaluate_unsupervised_and_few_shot(iqa_src: Path, tmp_home: Path) -> None:
    from solutions.industrial_qa.evaluation import evaluate

    base = evaluate(iqa_src, few_shot=0, speed=False)
    assert base["n_test"] == 384 and base["pixel_auroc"] is not None
    # floors under the measured figures (docs/BENCHMARKS.md: 0.930 / 0.777 with the two-scale input,
    # 0.918 image / 0.775 pixel AUROC with 5x5
    # feature pooling, 0.920 / 0.762 with 3x3 and the per-position memory bank at tile radius 0,
    # 0.915 / 0.749 at radius 2 (0.910 / 0.756 with a second VM's SSL net), 0.894 / 0.741 with
    # one global bank, 0.895 / 0.735 with the part-level term at the plain std, 0.893 / 0.697 without
    # it, 0.889-0.890 / 0.662-0.663 with "mean" pretext targets, 0.835 / 0.637 with the dataset input
    # normalisation, 0.761 / 0.571 with the old 150-step model): chance is 0.5, so a broken pipeline,
    # misaligned maps or a regression fail here; pixel floor 0.66 -> 0.70 with the 5x5 pooling
    assert base["image_auroc"] > 0.88 and base["pixel_auroc"] > 0.70
    few = evaluate(iqa_src, few_shot=50, speed=False)  # reuses the stored model
    assert few["trained_now"] is False and few["n_test"] == 334
    # the nested CV keeps the unsupervised score unless a head is confidently better (measured: the
    # same 0.913 on the 334 scored images as the unsupervised score at radius 2; at radius 0 the image
    # head was chosen: 0.931, 0.935 with 5x5 pooling); balanced threshold: 0.832 / 0.853 / 0.856
    assert few["image_auroc"] > base["image_auroc"] - 0.015
    assert few["accuracy_at_threshold"] > 0.78
    assert few["few_shot_choice"]["image"] in ("head", "unsup")


@pytest.mark.slow
def test_train_default_task_reports_progress(tmp_home: Path) -> None:
    from core.jobs import get_job
    from solutions.industrial_qa.manifest import MANIFEST
    from solutions.industrial_qa.tasks import train_default

    model = MANIFEST.default_models[0]
    out = train_default.run(model.job_key, steps=20, **model.kwargs)
    assert out["version"] == "v0001"
    job = get_job(model.job_key)
    assert job is not None and job.status == "succeeded" and job.progress == 1.0
    from core.settings import get_settings

    assert model.ready(get_settings())
