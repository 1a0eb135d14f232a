"""Celery tasks of the industrial_qa queue (thin: the work is in ``service`` and ``evaluation``).

``industrial_qa.inspect(inspection_id)``         one image; idempotent (updates its row by image id)
``industrial_qa.inspect_batch(inspection_ids)``  several queued images in one batched forward pass
``industrial_qa.train_default(job_key, ...)``    the default line model (queue ``training``)
``industrial_qa.train_line(job_key, line, data)`` any line from an MVTec-layout or plain folder
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.queue import app

log = logging.getLogger(__name__)


def training_data_dir(data: str) -> Path:
    """The folder a training request names: absolute, or relative to the data root."""
    from core.settings import get_settings

    return Path(data) if data.startswith("/") else get_settings().data_root / data


@app.task(name="industrial_qa.inspect")
def inspect(inspection_id: int) -> dict[str, Any]:
    from solutions.industrial_qa.service import run_inspections

    return {"inspection_id": inspection_id, "status": run_inspections([inspection_id]).get(inspection_id, "missing")}


@app.task(name="industrial_qa.inspect_batch")
def inspect_batch(inspection_ids: list[int]) -> dict[str, str]:
    from solutions.industrial_qa.service import run_inspections

    return {str(k): v for k, v in run_inspections(inspection_ids).items()}


def _train(job_key: str, line: str, data: str, steps: int | None = None,
           backbone: str | None = None) -> dict[str, Any]:
    import torch

    from core.jobs import JobReporter
    from solutions.industrial_qa.detector import DetectorConfig
    from solutions.industrial_qa.evaluation import train_line
    from solutions.industrial_qa.service import record_model_version

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    path = str(training_data_dir(data))
    cfg = DetectorConfig()
    if steps is not None:
        cfg.features.steps = int(steps)
    if backbone:
        cfg.use_backbone(backbone)  # a user-supplied ImageNet ResNet instead of SSL (backbone.py)
    with JobReporter(job_key, kind="train", solution="industrial_qa") as rep:
        from solutions.industrial_qa.evaluation import tqdm_progress

        bar, close = tqdm_progress(f"train {line}")
        stages = {"loading images": (0.0, 0.05), "self-supervised training": (0.05, 0.85),
                  "loading backbone": (0.05, 0.1),
                  "memory bank": (0.85, 0.95), "calibration": (0.95, 1.0), "done": (1.0, 1.0)}

        def cb(stage: str, frac: float) -> None:
            bar(stage, frac)
            lo, hi = stages.get(stage, (0.0, 1.0))
            rep.update(lo + (hi - lo) * frac, f"{line}: {stage}")

        try:
            version, folder, det = train_line(path, line, cfg, cb)
        finally:
            close()
        record_model_version(line, version, folder)
    return {"line": line, "version": version, "path": str(folder)}


@app.task(name="industrial_qa.train_default")
def train_default(job_key: str, line: str = "magnetic_tile", data: str = "industrial/magnetic_tile",
                  steps: int | None = None) -> dict[str, Any]:
    return _train(job_key, line, data, steps)


@app.task(name="industrial_qa.train_line")
def train_line_task(job_key: str, line: str, data: str, steps: int | None = None,
                    backbone: str | None = None) -> dict[str, Any]:
    return _train(job_key, line, data, steps, backbone)
