"""Orchestration around the detector: lines and model versions in the DB, inspections end to end,
heatmap files, the drop-folder watcher. Celery tasks, the CLI and the console call these.

Inspection contract: a row in ``iqa_inspections`` keyed by ``image_id`` (unique). Running an inspection
twice updates the same row and replaces its defects; an unreadable image leaves the row ``failed`` with
the reason in ``error`` and never raises out of :func:`run_inspections`.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import delete, select

from core.db import session_scope, utcnow
from core.errors import DataError, ModelNotReady, VerticalsError
from core.settings import get_settings
from solutions.industrial_qa import store
from solutions.industrial_qa.data import IMAGE_SUFFIXES
from solutions.industrial_qa.orm import Defect, Inspection, Line, ModelVersion


# --- lines and model versions ----------------------------------------------------------------------
def get_or_create_line(name: str, target_far: float = 0.01) -> int:
    store.check_line(name)
    with session_scope() as s:
        line = s.scalar(select(Line).where(Line.name == name))
        if line is None:
            line = Line(name=name, target_far=target_far)
            s.add(line)
            s.flush()
        return line.id


def record_model_version(line: str, version: str, folder: Path, kind: str = "unsupervised") -> int:
    """Upsert the DB row mirroring a stored version and mark it active for the line."""
    import json

    meta = json.loads((Path(folder) / "detector.json").read_text())
    line_id = get_or_create_line(line)
    num = int(version[1:])
    info = meta.get("info", {})
    with session_scope() as s:
        for mv in s.scalars(select(ModelVersion).where(ModelVersion.line_id == line_id)):
            mv.active = False
        row = s.scalar(select(ModelVersion).where(ModelVersion.line_id == line_id, ModelVersion.version == num))
        if row is None:
            row = ModelVersion(line_id=line_id, version=num, path=str(folder))
            s.add(row)
            row.threshold = (meta.get("calibrator") or {}).get("threshold")
        row.kind = "few-shot" if meta.get("fewshot") else kind
        row.active = True
        row.metrics = {"n_train": info.get("n_train"), "n_holdout": info.get("n_holdout"),
                       "train_seconds": info.get("train_seconds"), "data": info.get("data")}
        s.flush()
        return row.id


def set_line_threshold(line: str, threshold: float, target_far: float | None = None) -> None:
    """Set the decision threshold of the line's active model version (new inspections use it)."""
    version = store.active_version(line)
    if version is None:
        raise ModelNotReady(f"line {line!r} has no trained model")
    mv_id = record_model_version(line, version, store.line_dir(line) / version)
    with session_scope() as s:
        s.get(ModelVersion, mv_id).threshold = float(threshold)
        if target_far is not None:
            s.scalar(select(Line).where(Line.name == line)).target_far = float(target_far)


def _threshold(mv_id: int | None) -> float | None:
    if mv_id is None:
        return None
    with session_scope() as s:
        mv = s.get(ModelVersion, mv_id)
        return mv.threshold if mv is not None else None


def sync_versions(line: str) -> None:
    """Make sure every on-disk version of ``line`` has a DB row (CLI-trained models included)."""
    active = store.active_version(line)
    for v in store.list_versions(line):
        record_model_version(line, v, store.line_dir(line) / v)
    if active:
        record_model_version(line, active, store.line_dir(line) / active)


@functools.lru_cache(maxsize=4)
def _load_detector(path: str, mtime: float):  # noqa: ANN202  (cached per version folder)
    from solutions.industrial_qa.detector import AnomalyDetector, keep_freed_heap

    keep_freed_heap()  # the worker scores many batches: reuse freed buffers (1.3x, BENCHMARKS)
    return AnomalyDetector.load(Path(path))


def active_detector(line: str):  # noqa: ANN201
    path = store.active_path(line)
    return _load_detector(str(path), (path / "detector.json").stat().st_mtime)


# --- heatmap files ---------------------------------------------------------------------------------
def heatmap_dir() -> Path:
    d = get_settings().files_dir / "industrial_qa" / "heatmaps"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_heat_png(heatmap: np.ndarray, out: Path) -> Path:
    """Heatmap ``(H, W)`` in [0, 1] as an 8-bit grayscale PNG of the same size (pixel-aligned)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).save(out)
    return out


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a jet-coloured heatmap ``(H, W)`` over the image (resized to the image if needed)."""
    from matplotlib import colormaps

    rgb = image.convert("RGB")
    heat = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(rgb.size))
    colour = (colormaps["jet"](heat / 255.0)[..., :3] * 255).astype(np.uint8)
    a = (alpha * (heat / 255.0) ** 0.5)[..., None]
    return Image.fromarray((np.asarray(rgb) * (1 - a) + colour * a).astype(np.uint8))


def save_heatmap(image_path: Path, heatmap: np.ndarray, out: Path) -> Path:
    from solutions.industrial_qa.data import read_image

    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(read_image(image_path), heatmap).save(out)
    return out


def defect_regions(heatmap: np.ndarray, level: float = 0.5, max_regions: int = 10) -> list[dict]:
    """Connected regions of ``heatmap > level`` (largest first): bbox, area fraction and peak."""
    from scipy import ndimage

    lab, n = ndimage.label(heatmap > level)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        if sl is None:
            continue
        region = lab[sl] == i
        out.append({"x": sl[1].start, "y": sl[0].start, "width": sl[1].stop - sl[1].start,
                    "height": sl[0].stop - sl[0].start, "area_fraction": float(region.sum() / heatmap.size),
                    "peak": float(heatmap[sl][region].max())})
    return sorted(out, key=lambda r: -r["area_fraction"])[:max_regions]


# --- inspections -----------------------------------------------------------------------------------
def image_id_for(path: Path, line: str) -> str:
    """Content-addressed id: the same image dropped twice is one inspection."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{line}:{h.hexdigest()[:32]}"


def register_image(path: Path, line: str, image_id: str | None = None) -> int:
    """Create (or find) the inspection row for an image; returns its id."""
    path = Path(path)
    if image_id is None:
        try:
            image_id = image_id_for(path, line)
        except OSError as e:
            image_id = f"{line}:path:{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}"
            del e
    line_id = get_or_create_line(line)
    with session_scope() as s:
        row = s.scalar(select(Inspection).where(Inspection.image_id == image_id))
        if row is None:
            row = Inspection(image_id=image_id, line_id=line_id, image_path=str(path), status="queued")
            s.add(row)
            s.flush()
        return row.id


def _fail(inspection_id: int, message: str) -> None:
    with session_scope() as s:
        row = s.get(Inspection, inspection_id)
        if row is not None:
            row.status, row.error = "failed", message[:2000]
            row.score = row.probability = row.decision = row.heatmap_path = None
            s.execute(delete(Defect).where(Defect.inspection_id == inspection_id))


def run_inspections(inspection_ids: Sequence[int]) -> dict[int, str]:
    """Inspect rows (batched per line); returns {id: status}. Bad images fail alone, never raise."""
    with session_scope() as s:
        rows = [(r.id, r.image_path, r.line_id) for r in s.scalars(
            select(Inspection).where(Inspection.id.in_(list(inspection_ids))))]
        lines = {lid: s.get(Line, lid).name for lid in {r[2] for r in rows}}
    status: dict[int, str] = {}
    for line_id, line in lines.items():
        group = [(i, p) for i, p, lid in rows if lid == line_id]
        try:
            det = active_detector(line)
            version = store.active_version(line)
            mv_id = record_model_version(line, version, store.line_dir(line) / version) if version else None
        except (ModelNotReady, DataError) as e:
            for i, _ in group:
                _fail(i, str(e))
                status[i] = "failed"
            continue
        # decode first so one unreadable image cannot spoil the batch
        from solutions.industrial_qa.data import read_image

        good: list[tuple[int, Path]] = []
        for i, p in group:
            try:
                read_image(Path(p))
                good.append((i, Path(p)))
            except DataError as e:
                _fail(i, str(e))
                status[i] = "failed"
        if not good:
            continue
        try:
            results = det.inspect_images([p for _, p in good], threshold=_threshold(mv_id))
        except VerticalsError as e:
            for i, _ in good:
                _fail(i, str(e))
                status[i] = "failed"
            continue
        for (i, _p), r in zip(good, results, strict=True):
            heat = save_heat_png(r.heatmap, heatmap_dir() / f"{i}.png")
            with session_scope() as s:
                row = s.get(Inspection, i)
                row.status, row.error = "done", None
                row.score, row.probability = r.score, r.probability
                row.decision = "reject" if r.reject else "accept"
                row.defect_type = r.defect_type
                row.heatmap_path, row.model_version_id, row.latency_ms = str(heat), mv_id, r.latency_ms
                row.updated_at = utcnow()
                s.execute(delete(Defect).where(Defect.inspection_id == i))
                if r.reject:
                    for reg in defect_regions(r.heatmap):
                        s.add(Defect(inspection_id=i, defect_type=r.defect_type or "unknown", **reg))
            status[i] = "done"
    return status


# --- drop folder -----------------------------------------------------------------------------------
def scan_folder(folder: Path, line: str, seen: set[str]) -> list[int]:
    """Register new image files in ``folder`` (not yet in ``seen``); returns new inspection ids."""
    ids = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or str(p) in seen:
            continue
        try:  # skip files still being written (size changing)
            size = p.stat().st_size
            time.sleep(0.01)
            if p.stat().st_size != size:
                continue
        except OSError:
            continue
        seen.add(str(p))
        ids.append(register_image(p, line))
    return ids


def submit(ids: list[int], batch: int = 16) -> None:
    """Queue inspections: one ``inspect`` task for a single image, ``inspect_batch`` when they queue up."""
    from core.queue import app

    for k in range(0, len(ids), batch):
        chunk = ids[k:k + batch]
        if len(chunk) == 1:
            app.send_task("industrial_qa.inspect", kwargs={"inspection_id": chunk[0]})
        else:
            app.send_task("industrial_qa.inspect_batch", kwargs={"inspection_ids": chunk})


def watch_folder(folder: Path, line: str, interval: float = 1.0, once: bool = False,
                 echo: Callable[[str], None] = print) -> int:
    """Poll ``folder`` and queue new images until interrupted (or one scan with ``once``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"drop folder not found: {folder}")
    store.check_line(line)
    seen: set[str] = set()
    total = 0
    try:
        while True:
            ids = scan_folder(folder, line, seen)
            if ids:
                submit(ids)
                total += len(ids)
                echo(f"queued {len(ids)} image(s) from {folder} (total {total})")
            if once:
                return total
            time.sleep(interval)
    except KeyboardInterrupt:
        return total


# --- reviews -------------------------------------------------------------------------------------
def add_review(inspection_id: int, reviewer: str, verdict: str, label: str, defect_type: str | None = None,
               note: str = "") -> int:
    """Record (or replace) the operator's review of an inspection; one review per inspection."""
    from solutions.industrial_qa.orm import Review

    if verdict not in ("confirm", "overturn") or label not in ("good", "defect"):
        raise DataError("verdict must be confirm/overturn and label good/defect")
    with session_scope() as s:
        if s.get(Inspection, inspection_id) is None:
            raise DataError(f"no inspection #{inspection_id}")
        row = s.scalar(select(Review).where(Review.inspection_id == inspection_id))
        if row is None:
            row = Review(inspection_id=inspection_id, reviewer=reviewer, verdict=verdict, label=label)
            s.add(row)
        row.reviewer, row.verdict, row.label, row.note = reviewer, verdict, label, note
        row.defect_type = defect_type if label == "defect" else None
        s.flush()
        return row.id
