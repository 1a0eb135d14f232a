"""Upload: DICOM files or a zip (NIfTI/NRRD/PNG too) -> the ingest task on the worker queue."""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st
from sqlalchemy import select

from core.console import audit, require_user
from core.db import session_scope
from core.settings import get_settings
from solutions.medical_imaging.console.common import SOLUTION
from solutions.medical_imaging.orm import Upload

user = require_user("radiologist")
st.title("Upload studies")
settings = get_settings()
files = st.file_uploader("DICOM files, a zip of a study, or NIfTI/NRRD/PNG", accept_multiple_files=True)
history = st.text_area("Clinical history (optional)")
priority = st.selectbox("Priority", ["routine", "urgent", "stat"])
inline = st.checkbox("Process here instead of on the worker (small uploads)", value=False)
if files and st.button("Ingest", type="primary"):
    total = sum(f.size for f in files)
    if total > settings.max_upload_mb * 1024 * 1024:
        st.error(f"upload of {total / 1e6:.0f} MB exceeds the {settings.max_upload_mb} MB limit")
        st.stop()
    h = hashlib.sha256()
    for f in files:
        h.update(f.getvalue())
    key = "upload:" + h.hexdigest()[:32]
    folder = settings.files_dir / SOLUTION / "uploads" / key.split(":")[1]
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name.replace("/", "_").lstrip(".")).write_bytes(f.getvalue())
    audit("upload", target=key, detail={"files": len(files)}, solution=SOLUTION)
    if inline:
        from solutions.medical_imaging.workflow import ingest_path

        summary = ingest_path(folder, upload_key=key, history=history, priority=priority, username=user.username)
        st.success(f"ingested {summary.n_instances} images into {len(summary.study_uids)} study(ies)")
        for e in summary.errors:
            st.warning(e["reason"])
    else:
        from core.queue import app

        app.send_task("medical_imaging.ingest", kwargs={"path": str(folder), "upload_key": key,
                                                        "history": history, "priority": priority, "draft": True})
        st.success(f"queued for ingest ({key}); it appears on the worklist when done")

with session_scope() as s:
    ups = list(s.scalars(select(Upload).order_by(Upload.created_at.desc()).limit(50)))
    table = [{"key": u.key, "status": u.status, "files": u.n_files, "ok": u.n_ok, "studies": len(u.study_uids),
              "errors": "; ".join(e["reason"] for e in u.errors)[:300]} for u in ups]
if table:
    st.subheader("Recent uploads")
    st.dataframe(pd.DataFrame(table), hide_index=True, use_container_width=True)
