"""Shared helpers of the console pages: cached model, study lists, slice rendering."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st
from sqlalchemy import select

from core.db import session_scope
from solutions.medical_imaging.orm import Report, Study

SOLUTION = "medical_imaging"
STUDY_KEY = "mi_study_uid"


@st.cache_resource(show_spinner="loading the reporter model ...")
def reporter(mtime: float) -> Any:
    from solutions.medical_imaging.pipeline import Reporter

    return Reporter()


def get_reporter() -> Any | None:
    """The trained reporter, or None while it is still training."""
    from solutions.medical_imaging.pipeline import WEIGHTS, default_model_dir, model_ready

    d = default_model_dir()
    if not model_ready(d):
        return None
    return reporter((d / WEIGHTS).stat().st_mtime)


def list_studies(limit: int = 500) -> list[dict[str, Any]]:
    with session_scope() as s:
        rows = []
        for st_ in s.scalars(select(Study).order_by(Study.created_at.desc()).limit(limit)):
            rep = s.scalar(select(Report).where(Report.study_id == st_.id))
            rows.append({
                "study_uid": st_.study_uid, "patient": st_.patient.pseudonym if st_.patient else "",
                "status": st_.status, "modality": st_.modality, "priority": st_.priority,
                "series": st_.n_series, "images": st_.n_instances, "report": rep.status if rep else "none",
                "received": st_.created_at.strftime("%Y-%m-%d %H:%M"), "error": st_.error or "",
            })
        return rows


@st.cache_data(max_entries=8, show_spinner=False)
def load_series(series_id: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(Z, H, W) slices in modality units and display hints (modality, stored window)."""
    from solutions.medical_imaging.workflow import series_slices

    vol, ds = series_slices(series_id)
    hint: dict[str, Any] = {"modality": str(ds.get("Modality", ""))}
    if "WindowCenter" in ds and "WindowWidth" in ds:
        from solutions.medical_imaging.dicom_io import default_window

        hint["header_window"] = default_window(ds, vol[len(vol) // 2])
    return vol, hint
