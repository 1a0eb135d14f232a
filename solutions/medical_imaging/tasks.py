"""Celery tasks of the ``medical_imaging`` queue (thin: the work is in ``workflow`` and ``pipeline``).

``medical_imaging.ingest(path, upload_key)``      files/folder/zip -> de-identified studies; idempotent by UID
``medical_imaging.draft_report(study_uid)``        AI draft of one study; idempotent (an existing draft is kept)
``medical_imaging.train_default(job_key, data)``   the default reporter (queue ``training``)

Bad input never raises out of a task: it is recorded (upload errors, study status ``failed``) and
returned, so the message is acked once instead of being redelivered forever.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from core.errors import DataError, ModelNotReady, VerticalsError
from core.queue import app

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _reporter(path: str, mtime: float) -> Any:
    from solutions.medical_imaging.pipeline import Reporter

    return Reporter(path)


def cached_reporter() -> Any:
    """The trained reporter, loaded once per process (reloaded when the checkpoint changes)."""
    from solutions.medical_imaging.pipeline import WEIGHTS, default_model_dir, model_ready

    d = default_model_dir()
    if not model_ready(d):
        raise ModelNotReady("the reporter model is not trained yet (training runs in the background)")
    return _reporter(str(d), (d / WEIGHTS).stat().st_mtime)


@app.task(name="medical_imaging.ingest")
def ingest(path: str, upload_key: str | None = None, history: str = "", priority: str = "routine",
           draft: bool = False) -> dict[str, Any]:
    from solutions.medical_imaging.workflow import ingest_path

    try:
        summary = ingest_path(path, upload_key=upload_key, history=history, priority=priority).as_dict()
    except DataError as e:  # the whole input unusable (missing path, zip bomb): record, don't retry
        from sqlalchemy import select

        from core.db import session_scope
        from solutions.medical_imaging.orm import Upload

        key = upload_key or f"path:{path}"
        with session_scope() as s:
            up = s.scalar(select(Upload).where(Upload.key == key)) or Upload(key=key)
            s.add(up)
            up.source, up.status, up.errors = path, "failed", [{"file": path, "reason": str(e)}]
        return {"upload_key": key, "status": "failed", "error": str(e)}
    if draft:
        for uid in summary["study_uids"]:
            app.send_task("medical_imaging.draft_report", kwargs={"study_uid": uid})
    return summary


@app.task(name="medical_imaging.draft_report")
def draft_report(study_uid: str, force: bool = False) -> dict[str, Any]:
    from solutions.medical_imaging.workflow import draft_study

    try:
        v = draft_study(study_uid, cached_reporter(), force=force)
    except ModelNotReady:
        raise  # transient: the default model trains in the background; Celery records the failure
    except VerticalsError as e:
        _mark_failed(study_uid, str(e))
        return {"study_uid": study_uid, "status": "failed", "error": str(e)}
    return {"study_uid": study_uid, "status": "drafted", "version": v.version, "findings": v.findings}


def _mark_failed(study_uid: str, reason: str) -> None:
    from sqlalchemy import select

    from core.db import session_scope
    from solutions.medical_imaging.orm import Study

    with session_scope() as s:
        st = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if st is not None and st.status in ("ingested", "failed"):
            st.error = reason[:4000]


@app.task(name="medical_imaging.train_default")
def train_default(job_key: str, data: str = "medical/medpix2", enc_epochs: int = 30,
                  dec_epochs: int = 15) -> dict[str, Any]:
    from core.jobs import JobReporter, progress
    from core.settings import get_settings
    from solutions.medical_imaging.pipeline import default_model_dir, train_reporter

    root = Path(data) if data.startswith("/") else get_settings().data_root / data
    with JobReporter(job_key, kind="train", solution="medical_imaging") as rep:
        def prog(it: Any, desc: str = "", **kw: Any) -> Any:
            return progress(it, desc=desc, reporter=rep, **kw)

        return train_reporter(root, default_model_dir(), enc_epochs=enc_epochs, dec_epochs=dec_epochs,
                              progress=prog, log=log.info)
