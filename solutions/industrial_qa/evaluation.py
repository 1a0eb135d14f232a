"""Train and evaluate on an MVTec-layout folder (pure pipeline: no DB, Celery or UI).

``train_line``: fit a detector on ``DIR/train/good`` and store it as the line's next version.
``evaluate``: fit (or reuse the line's stored model trained on the same folder) on ``DIR/train/good``,
optionally refine with ``few_shot`` seeded labelled test defects, score the remaining ``DIR/test``
images and return the report dict (quality metrics + throughput + latency).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.errors import DataError
from solutions.industrial_qa import metrics, store
from solutions.industrial_qa.data import load_batch, load_mask, load_mvtec, normal_paths
from solutions.industrial_qa.detector import AnomalyDetector, DetectorConfig

Progress = Callable[[str, float], None]


def tqdm_progress(desc: str = "industrial-qa") -> tuple[Progress, Callable[[], None]]:
    """A stage-aware tqdm bar on stderr: returns (callback, close)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
    weights = {"loading images": (0.0, 0.05), "self-supervised training": (0.05, 0.85),
               "memory bank": (0.85, 0.95), "calibration": (0.95, 1.0), "done": (1.0, 1.0)}

    def cb(stage: str, frac: float) -> None:
        lo, hi = weights.get(stage, (0.0, 1.0))
        pos = int(1000 * (lo + (hi - lo) * min(max(frac, 0.0), 1.0)))
        bar.set_description(f"{desc} [{stage}]")
        if pos > bar.n:
            bar.update(pos - bar.n)

    return cb, bar.close


def dataset_line_name(data_dir: Path) -> str:
    """A stable line name for an evaluation folder: ``eval-<folder>-<hash of its path>``."""
    p = Path(data_dir).expanduser().resolve()
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in p.name)[:60] or "data"
    return f"eval-{safe}-{digest}"


def train_line(data_dir: Path, line: str, config: DetectorConfig | None = None,
               on_progress: Progress | None = None) -> tuple[str, Path, AnomalyDetector]:
    """Fit on ``data_dir/train/good`` (or a plain folder of normal images) and store a new version."""
    data_dir = Path(data_dir).expanduser()
    store.check_line(line)
    det = AnomalyDetector(config).fit(normal_paths(data_dir), on_progress)
    det.info["data"] = str(data_dir.resolve())
    version, folder = store.new_version_dir(line)
    det.save(folder)
    store.set_active(line, version)
    return version, folder, det


def _matching_model(line: str, data_dir: Path, config: DetectorConfig) -> AnomalyDetector | None:
    if not store.is_ready(line):
        return None
    det = AnomalyDetector.load(store.active_path(line))
    same_data = det.info.get("data") == str(Path(data_dir).expanduser().resolve())
    inference_only = ("fusion", "norm", "background", "blur_sigma", "batch_size", "target_far", "global_weight",
                      "coarse_background")
    a = {k: v for k, v in det.config.to_dict().items() if k not in inference_only}
    b = {k: v for k, v in config.to_dict().items() if k not in inference_only}
    if not (same_data and a == b and det.fewshot is None):
        return None
    if any(getattr(det.config, k) != getattr(config, k) for k in inference_only):
        for k in inference_only:
            setattr(det.config, k, getattr(config, k))
        det.recalibrate()
    return det


def measure_speed(det: AnomalyDetector, paths: list[Path], n_batch: int = 128, n_single: int = 40
                  ) -> dict[str, float]:
    """Batched images/s on decoded model-size arrays and p95 single-image latency (decode included).

    Wall-clock figures depend on what else the machine runs; the ``*_cpu`` figures divide by this
    process's CPU time instead (all threads), so they show what the code costs on a machine shared
    with other work: ``images_per_cpu_s`` x cores is the uncontended ceiling.
    """
    size = det.config.features.image_size
    x = load_batch(paths[: min(len(paths), det.config.batch_size)], size)
    reps = max(1, n_batch // len(x))
    det.score_arrays(x[:2])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        det.score_arrays(x)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    lat, lat_cpu = [], []
    for p in (paths * ((n_single // max(len(paths), 1)) + 1))[:n_single]:
        t, c = time.perf_counter(), time.process_time()
        det.inspect_images([p])
        lat.append((time.perf_counter() - t) * 1000)
        lat_cpu.append((time.process_time() - c) * 1000)
    return {"images_per_s": reps * len(x) / wall, "latency_ms_p95": float(np.percentile(lat, 95)),
            "images_per_cpu_s": reps * len(x) / max(cpu, 1e-9),
            "latency_cpu_ms_p95": float(np.percentile(lat_cpu, 95)), "threads": torch.get_num_threads()}


def evaluate(data_dir: Path, few_shot: int = 0, seed: int = 0, config: DetectorConfig | None = None,
             line: str | None = None, on_progress: Progress | None = None, speed: bool = True,
             speed_images: int = 128, few_shot_threshold: str = "balanced") -> dict:
    """The ``evaluate`` report for an MVTec-layout folder (see module docstring).

    With ``few_shot`` the decision threshold is ``few_shot_threshold`` (:meth:`FewShotHead.fit`):
    ``"balanced"`` by default, as the labelled shots make the recall side measurable (the accuracy
    target); ``"far"`` keeps the false-alarm-rate threshold.
    """
    torch.manual_seed(seed)
    data_dir = Path(data_dir).expanduser()
    ds = load_mvtec(data_dir)
    config = config or DetectorConfig()
    line = line or dataset_line_name(data_dir)
    det = _matching_model(line, data_dir, config)
    trained = det is None
    if det is None:
        _, _, det = train_line(data_dir, line, config, on_progress)
    size = config.features.image_size
    from solutions.industrial_qa.data import few_shot_split

    shots, rest = few_shot_split(ds.test, few_shot, seed)
    if shots:
        from solutions.industrial_qa.fewshot import FewShotHead

        hold = [Path(p) for p in det.info.get("holdout_paths", [])]
        if not hold:
            raise DataError("the stored model has no held-out normals recorded; retrain it")
        shot_x = load_batch([s.path for s in shots], size)
        shot_m = np.stack([load_mask(s, size) for s in shots]) if ds.has_masks else None
        head, calib = FewShotHead.fit(det, shot_x, shot_m, [s.defect_type for s in shots],
                                      load_batch(hold, size), seed=seed, normals_are_holdout=True,
                                      threshold=few_shot_threshold)
        det.fewshot, det.calibrator = head, calib
    labels = np.array([s.label for s in rest])
    scores, maps, masks = [], [], []
    from tqdm.auto import tqdm

    chunk = 32
    for i in tqdm(range(0, len(rest), chunk), desc="scoring test images", file=sys.stderr):
        part = rest[i:i + chunk]
        out = det.score_arrays(load_batch([s.path for s in part], size))
        scores.append(out.scores)
        if ds.has_masks:
            maps.append(out.maps.astype(np.float16))
            masks.append(np.stack([load_mask(s, size) for s in part]))
    score_arr = np.concatenate(scores)
    report: dict = {"dataset": str(data_dir), "line": line, "few_shot": len(shots), "seed": seed,
                    "n_test": len(rest), "n_defect": int(labels.sum()), "trained_now": trained,
                    "train_seconds": det.info.get("train_seconds"),
                    "threshold": det.calibrator.threshold, "target_far": det.calibrator.target_far}
    if shots and det.fewshot is not None:
        report["few_shot_threshold"] = few_shot_threshold
        report["few_shot_choice"] = {"map": det.fewshot.map_mode, "image": det.fewshot.image_mode,
                                     **det.fewshot.cv}
    report |= metrics.summary(score_arr, labels, det.calibrator.threshold,
                              np.concatenate(maps).astype(np.float32) if maps else None,
                              np.concatenate(masks) if masks else None)
    if speed:
        report |= measure_speed(det, [s.path for s in rest], n_batch=speed_images,
                                n_single=max(10, speed_images // 3))
    else:
        report |= {"images_per_s": None, "latency_ms_p95": None}
    return report
