"""Capacity: jobs/s sustained per worker and latency for each solution's main task, through Celery.

``verticals capacity --json`` runs, for each solution, one real worker process (concurrency 1) on
that solution's queue and measures:

- ``latency_ms_p50`` / ``latency_ms_p95``: one job at a time, submit -> result (broker, worker, model,
  DB writes and result backend included): what a user waiting on one item sees;
- ``jobs_per_s``: ``--jobs`` jobs submitted at once, from the first submit to the last result: what one
  worker sustains when the queue is full (scale out by adding workers: one per core);
- ``completed`` / ``failed``: checked in the solution's own tables afterwards (every job must finish).

Main tasks: ``industrial_qa.inspect`` (one real magnetic-tile image: decode, score, heatmap PNG,
defect rows), ``customer_service.process_turn`` (one real SGD dev customer turn: state tracking,
next action, reply suggestion), ``medical_imaging.ingest`` (one DICOM CT slice from pydicom's test
files, re-identified as a new study each time: parse, de-identify, store, register; no model) and,
where a reporter model exists, ``medical_imaging.draft_report`` (key image -> reporter -> draft
report version; reported as ``medical_imaging.draft``).

Models: the run uses a private ``VERTICALS_HOME`` whose ``models/`` is copied from ``--models-from``
(default: the configured home, i.e. the models ``verticals up`` trained). A solution whose model is
missing is skipped with the reason, unless ``--tiny-models`` trains a tiny one in the run; tiny models
measure the queue/DB/model-load path, not production model speed, and the output says which was used.
Services: the configured database and broker (``--no-managed``, default) or private Redis + PostgreSQL
(``--managed``, as ``verticals chaos`` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from core.errors import DataError

SOLUTIONS = ("industrial_qa", "customer_service", "medical_imaging")


@dataclass
class Probe:
    """One solution's main task: how to make ``n`` distinct jobs and how to count their outcome."""

    task: str
    queue: str
    model: str  # "home", "tiny" or "none"
    make_jobs: Callable[[int], list[dict[str, Any]]]
    outcome: Callable[[list[dict[str, Any]]], dict[str, int]]


# ---------------------------------------------------------------- industrial QA
def _iqa_probe(data_root: Path, tiny: bool, workdir: Path) -> Probe | str:
    from sqlalchemy import select

    from core.db import session_scope
    from core.settings import get_settings
    from solutions.industrial_qa import store
    from solutions.industrial_qa.orm import Inspection
    from solutions.industrial_qa.service import register_image, sync_versions

    src = data_root / "industrial" / "magnetic_tile"
    if not (src / "test").is_dir():
        return f"no MVTec-layout data at {src}"
    root = get_settings().models_dir / "industrial_qa"
    ready = sorted(p.name for p in root.iterdir() if p.is_dir() and store.is_ready(p.name)) if root.is_dir() else []
    line = store.DEFAULT_LINE if store.DEFAULT_LINE in ready else (ready[0] if ready else store.DEFAULT_LINE)
    sync_versions(line)
    model = "home" if line in ready else "none"
    if model == "none":
        if not tiny:
            return "no trained detector for any line (run `verticals up` or `verticals industrial-qa train`), or pass --tiny-models"
        from solutions.industrial_qa.detector import DetectorConfig
        from solutions.industrial_qa.evaluation import train_line
        from solutions.industrial_qa.service import record_model_version

        sub = workdir / "iqa-train" / "train" / "good"
        sub.mkdir(parents=True)
        for p in sorted((src / "train" / "good").iterdir())[:24]:
            (sub / p.name).symlink_to(p)
        version, folder, _ = train_line(sub.parent.parent, line, DetectorConfig.tiny())
        record_model_version(line, version, folder)
        model = "tiny"
    images = sorted(p for p in (src / "test").rglob("*") if p.suffix.lower() in (".jpg", ".png", ".bmp"))
    random.Random(0).shuffle(images)

    def make(n: int) -> list[dict[str, Any]]:
        if n > len(images):
            raise DataError(f"only {len(images)} distinct test images for {n} inspect jobs")
        picked, images[:] = images[:n], images[n:]
        return [{"inspection_id": register_image(p, line)} for p in picked]

    def outcome(jobs: list[dict[str, Any]]) -> dict[str, int]:
        ids = [j["inspection_id"] for j in jobs]
        with session_scope() as s:
            rows = list(s.scalars(select(Inspection).where(Inspection.id.in_(ids))))
        return {"completed": sum(r.status == "done" for r in rows), "failed": sum(r.status == "failed" for r in rows)}

    return Probe("industrial_qa.inspect", "industrial_qa", model if model == "tiny" else f"home (line {line})",
                 make, outcome)


# ---------------------------------------------------------------- customer service
def _cs_probe(data_root: Path, tiny: bool, workdir: Path) -> Probe | str:
    from sqlalchemy import select

    from core.db import session_scope
    from solutions.customer_service import store
    from solutions.customer_service.data import load_sgd
    from solutions.customer_service.orm import TurnState
    from solutions.customer_service.pipeline import is_trained, model_folder

    root = data_root / "customer_service"
    if not (root / "sgd" / "dev").is_dir():
        return f"no SGD data at {root / 'sgd'}"
    model = "home"
    if not is_trained("dst", "sgd"):
        if not tiny:
            return "no trained dialogue-state tracker (run `verticals up` or `verticals customer-service train --task dst`), or pass --tiny-models"
        from solutions.customer_service.dst import TrackerConfig
        from solutions.customer_service.dst_train import train_tracker
        from solutions.customer_service.encoder import MiniLMEncoder

        tr = load_sgd(root, "train")
        pool = [d for d in tr.dialogues if d["services"] == ["Restaurants_1"]]
        dialogues = random.Random(0).sample(pool, min(30, len(pool)))
        enc = MiniLMEncoder(cache_dir=model_folder("dst", "sgd").parent / "cache")
        tracker = train_tracker(dialogues, {"Restaurants_1": tr.schemas["Restaurants_1"]}, enc, TrackerConfig(epochs=4))
        tracker.save(model_folder("dst", "sgd"))
        model = "tiny"
    dev = load_sgd(root, "dev", limit=200)
    dialogues = list(dev.dialogues)
    random.Random(0).shuffle(dialogues)

    def make(n: int) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = []
        while len(jobs) < n:
            if not dialogues:
                raise DataError(f"not enough SGD dev turns for {n} process_turn jobs")
            d = dialogues.pop()
            turns = [("customer" if t["speaker"] == "USER" else "agent", t["utterance"]) for t in d["turns"]]
            cid = store.import_transcript(f"capacity-{d['dialogue_id']}", turns, services=list(d["services"]))
            jobs += [{"conversation_id": cid, "turn_id": t.id} for t in store.conversation_turns(cid)
                     if t.role == "customer"]
        return jobs[:n]

    def outcome(jobs: list[dict[str, Any]]) -> dict[str, int]:
        ids = [j["turn_id"] for j in jobs]
        with session_scope() as s:
            rows = list(s.scalars(select(TurnState).where(TurnState.turn_id.in_(ids))))
        return {"completed": sum(r.status == "ok" for r in rows), "failed": sum(r.status == "failed" for r in rows)}

    return Probe("customer_service.process_turn", "customer_service", model, make, outcome)


# ---------------------------------------------------------------- medical imaging
def _dicom_slices(workdir: Path, n: int, start: int) -> list[Path]:
    """``n`` copies of pydicom's real CT test slice, each a new patient/study/series/instance."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = workdir / "dicom"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        ds = src.copy()
        ds.PatientID, ds.PatientName = f"CAP{i:05d}", f"Capacity^{i:05d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"ct_{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _mi_probe(data_root: Path, tiny: bool, workdir: Path) -> Probe | str:
    from sqlalchemy import select

    from core.db import session_scope
    from solutions.medical_imaging.orm import Upload

    counter = {"next": 0}

    def make(n: int) -> list[dict[str, Any]]:
        paths = _dicom_slices(workdir, n, counter["next"])
        counter["next"] += n
        return [{"path": str(p), "upload_key": f"capacity:{p.name}"} for p in paths]

    def outcome(jobs: list[dict[str, Any]]) -> dict[str, int]:
        keys = [j["upload_key"] for j in jobs]
        with session_scope() as s:
            rows = list(s.scalars(select(Upload).where(Upload.key.in_(keys))))
        return {"completed": sum(r.status != "failed" for r in rows), "failed": sum(r.status == "failed" for r in rows)}

    return Probe("medical_imaging.ingest", "medical_imaging", "none", make, outcome)


def _mi_draft_probe(data_root: Path, tiny: bool, workdir: Path) -> Probe | str:
    """``draft_report`` on studies ingested for it (one CT slice each) with the stored reporter."""
    from sqlalchemy import select

    from core.db import session_scope
    from solutions.medical_imaging.orm import Report, ReportVersion, Study
    from solutions.medical_imaging.pipeline import model_ready
    from solutions.medical_imaging.workflow import ingest_path

    if not model_ready():
        return "no trained reporter (run `verticals up` or `verticals medical-imaging train`)"
    counter = {"next": 100_000}

    def make(n: int) -> list[dict[str, Any]]:
        paths = _dicom_slices(workdir, n, counter["next"])
        counter["next"] += n
        return [{"study_uid": uid} for p in paths for uid in ingest_path(p).study_uids]

    def outcome(jobs: list[dict[str, Any]]) -> dict[str, int]:
        uids = [j["study_uid"] for j in jobs]
        with session_scope() as s:
            drafted = set(s.scalars(select(Study.study_uid).join(Report, Report.study_id == Study.id)
                                    .join(ReportVersion, ReportVersion.report_id == Report.id)
                                    .where(Study.study_uid.in_(uids))))
        return {"completed": len(drafted), "failed": len(set(uids) - drafted)}

    return Probe("medical_imaging.draft_report", "medical_imaging", "home", make, outcome)


# Each solution's main task first; a solution may have a second, model-bound task after its ingest.
PROBES: dict[str, list[Callable[[Path, bool, Path], Probe | str]]] = {
    "industrial_qa": [_iqa_probe], "customer_service": [_cs_probe], "medical_imaging": [_mi_probe, _mi_draft_probe]}


# ---------------------------------------------------------------- the measurement
def measure(probe: Probe, jobs: int, latency_jobs: int, timeout: float = 1800.0) -> dict[str, Any]:
    """Warm up, then serial latency, then a full-queue burst; all through the running worker."""
    from core.queue import app

    def run_one(kw: dict[str, Any]) -> float:
        t = time.perf_counter()
        app.send_task(probe.task, kwargs=kw).get(timeout=timeout, interval=0.01, propagate=True)
        return time.perf_counter() - t

    warm = probe.make_jobs(1)
    run_one(warm[0])  # model load, imports, DB connections
    serial = probe.make_jobs(latency_jobs)
    lat = [run_one(kw) * 1000 for kw in serial]
    burst = probe.make_jobs(jobs)
    t0 = time.perf_counter()
    results = [app.send_task(probe.task, kwargs=kw) for kw in burst]
    for r in results:
        r.get(timeout=timeout, interval=0.01, propagate=True)
    dt = time.perf_counter() - t0
    counts = probe.outcome(warm + serial + burst)
    total = len(warm) + len(serial) + len(burst)
    return {"task": probe.task, "model": probe.model, "jobs": len(burst), "jobs_per_s": round(len(burst) / dt, 2),
            "burst_seconds": round(dt, 2), "latency_jobs": len(serial),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
            "submitted": total, **counts, "lost": total - counts["completed"] - counts["failed"]}


def run_capacity(solutions: list[str], jobs: int = 50, latency_jobs: int = 20, tiny_models: bool = False,
                 managed: bool = False, models_from: Path | None = None, workdir: Path | None = None,
                 log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Measure each solution's main task; returns ``{solution: {...figures...} | {"skipped": reason}}``."""
    from core.chaos import Harness, _environment, private_services
    from core.settings import get_settings
    from infra.migrate import upgrade

    unknown = [s for s in solutions if s not in SOLUTIONS]
    if unknown:
        raise typer.BadParameter(f"unknown solution(s) {unknown}; choose from {', '.join(SOLUTIONS)}")
    if jobs < 1 or latency_jobs < 1:
        raise typer.BadParameter("--jobs and --latency-jobs must be >= 1")
    settings = get_settings()
    src_models = Path(models_from or settings.models_dir)
    data_root = settings.data_root
    root = Path(workdir or tempfile.mkdtemp(prefix="verticals-capacity-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        if managed:
            env = dict(stack.enter_context(private_services(root))[2])
        else:
            # A private SQLite + embedded broker under the run's home unless the operator configured
            # external services (then those are measured, with rows for this run only).
            env = {k: os.environ[k] for k in ("VERTICALS_DATABASE_URL", "VERTICALS_BROKER_URL",
                                              "VERTICALS_RESULT_BACKEND") if os.environ.get(k)}
        home = root / "home"
        (home / "models").mkdir(parents=True, exist_ok=True)
        if src_models.is_dir():
            shutil.copytree(src_models, home / "models", dirs_exist_ok=True, symlinks=True)
        env |= {"VERTICALS_HOME": str(home), "VERTICALS_DATA_ROOT": str(data_root), "PYTHONUNBUFFERED": "1"}
        with _environment(env):
            upgrade("heads")
            backend = "redis" if not get_settings().embedded_broker else "embedded"
            for sol in solutions:
                for i, make_probe in enumerate(PROBES[sol]):
                    key = sol if i == 0 else f"{sol}.{make_probe.__name__.removeprefix('_mi_').removesuffix('_probe')}"
                    log(f"{key}: preparing ...")
                    probe = make_probe(data_root, tiny_models, root / sol)
                    if isinstance(probe, str):
                        out[key] = {"skipped": probe}
                        log(f"{key}: skipped ({probe})")
                        continue
                    h = Harness(env=dict(os.environ), log_dir=root)
                    try:
                        name = f"capacity-{sol}"
                        h.start_worker(name, 1, (probe.queue,))
                        h.wait_workers([name], timeout=120)
                        log(f"{key}: measuring {probe.task} ({probe.model} model) ...")
                        out[key] = {**measure(probe, jobs, latency_jobs), "broker": backend, "workers": 1,
                                    "worker_concurrency": 1}
                    finally:
                        h.stop_all()
                    log(f"{key}: {json.dumps(out[key])}")
    return out


def register(app: typer.Typer) -> None:
    @app.command("capacity")
    def capacity(
        solution: Annotated[list[str] | None, typer.Option("--solution", "-s", help=f"Repeatable; default all: {', '.join(SOLUTIONS)}")] = None,
        jobs: Annotated[int, typer.Option(help="Jobs in the full-queue burst (jobs/s).")] = 50,
        latency_jobs: Annotated[int, typer.Option(help="Jobs run one at a time (latency percentiles).")] = 20,
        tiny_models: Annotated[bool, typer.Option(help="Train tiny models for solutions that have none.")] = False,
        managed: Annotated[bool, typer.Option(help="Private Redis + PostgreSQL instead of the configured services.")] = False,
        models_from: Annotated[Path | None, typer.Option(help="Models folder to measure (default: VERTICALS_HOME/models).")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Jobs/s per worker and p50/p95 latency of each solution's main task through real Celery workers."""
        res = run_capacity(list(solution or SOLUTIONS), jobs, latency_jobs, tiny_models, managed, models_from,
                           log=lambda m: typer.echo(m, err=True))
        if as_json:
            typer.echo(json.dumps(res))
            return
        for sol, r in res.items():
            if "skipped" in r:
                typer.echo(f"{sol:18s} skipped: {r['skipped']}")
            else:
                typer.echo(f"{sol:18s} {r['task']:32s} {r['jobs_per_s']:7.2f} jobs/s per worker   "
                           f"p50 {r['latency_ms_p50']:8.1f} ms  p95 {r['latency_ms_p95']:8.1f} ms   "
                           f"{r['completed']}/{r['submitted']} done, {r['failed']} failed, {r['lost']} lost ({r['model']} model)")
