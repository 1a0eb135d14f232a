"""Queries and widgets shared by the console pages (no page logic here)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
from sqlalchemy import select

from core.db import session_scope
from solutions.industrial_qa.orm import Defect, Inspection, Line, ModelVersion, Review

SOLUTION = "industrial_qa"


def line_names() -> list[str]:
    with session_scope() as s:
        return list(s.scalars(select(Line.name).order_by(Line.name)))


def pick_line(key: str = "line") -> str | None:
    """A line selector in the sidebar (remembered across pages)."""
    names = line_names()
    if not names:
        st.info("No production line yet. Train one (`verticals industrial-qa train --data DIR --line NAME`) "
                "or wait for the default model to finish training.")
        return None
    current = st.session_state.get("iqa_line")
    idx = names.index(current) if current in names else 0
    name = st.sidebar.selectbox("Line", names, index=idx, key=key)
    st.session_state["iqa_line"] = name
    return name


def inspections_df(line: str, limit: int = 5000) -> pd.DataFrame:
    """Recent inspections of a line, newest first, with the operator's review label if any."""
    with session_scope() as s:
        line_id = s.scalar(select(Line.id).where(Line.name == line))
        q = (select(Inspection, Review.label, Review.defect_type)
             .outerjoin(Review, Review.inspection_id == Inspection.id)
             .where(Inspection.line_id == line_id).order_by(Inspection.created_at.desc()).limit(limit))
        rows = [{"id": i.id, "image_path": i.image_path, "status": i.status, "error": i.error,
                 "score": i.score, "probability": i.probability, "decision": i.decision,
                 "defect_type": i.defect_type, "heatmap_path": i.heatmap_path, "latency_ms": i.latency_ms,
                 "model_version_id": i.model_version_id, "created_at": i.created_at,
                 "review_label": lbl, "review_type": rtype} for i, lbl, rtype in s.execute(q)]
    cols = ["id", "image_path", "status", "error", "score", "probability", "decision", "defect_type",
            "heatmap_path", "latency_ms", "model_version_id", "created_at", "review_label", "review_type"]
    return pd.DataFrame(rows, columns=cols)


def defects_df(line: str) -> pd.DataFrame:
    with session_scope() as s:
        line_id = s.scalar(select(Line.id).where(Line.name == line))
        q = (select(Defect.defect_type, Defect.area_fraction, Inspection.id)
             .join(Inspection, Inspection.id == Defect.inspection_id).where(Inspection.line_id == line_id))
        return pd.DataFrame([tuple(r) for r in s.execute(q)], columns=["defect_type", "area_fraction", "id"])


def versions_df(line: str) -> pd.DataFrame:
    with session_scope() as s:
        line_id = s.scalar(select(Line.id).where(Line.name == line))
        q = select(ModelVersion).where(ModelVersion.line_id == line_id).order_by(ModelVersion.version.desc())
        rows = [{"id": m.id, "version": f"v{m.version:04d}", "kind": m.kind, "active": m.active,
                 "threshold": m.threshold, "created_at": m.created_at, "path": m.path, **(m.metrics or {})}
                for m in s.scalars(q)]
    return pd.DataFrame(rows)


def overlay_image(image_path: str, heatmap_path: str | None):  # noqa: ANN201
    """The part image with its heatmap blended over it (or the plain image without a heatmap)."""
    import numpy as np
    from PIL import Image

    from solutions.industrial_qa.data import read_image
    from solutions.industrial_qa.service import overlay

    img = read_image(Path(image_path))
    if heatmap_path and Path(heatmap_path).is_file():
        heat = np.asarray(Image.open(heatmap_path), dtype=np.float32) / 255.0
        return overlay(img, heat)
    return img


def training_request_problem(data: str, backbone: str = "") -> str | None:
    """What is wrong with a "train a new version" request (a message the operator can act on), or None.

    Checked before the job is queued, so a typo fails here instead of in the worker: the data folder
    (absolute, or relative to the data root, as the training task resolves it) must exist, and a
    backbone checkpoint, when given, must be a ResNet state dict ``backbone.py`` can read.
    """
    from core.errors import VerticalsError
    from core.settings import get_settings
    from solutions.industrial_qa.tasks import training_data_dir

    folder = training_data_dir(data)
    if not folder.is_dir():
        return f"data folder not found: {folder} (give an absolute path or one under {get_settings().data_root})"
    if backbone:
        from solutions.industrial_qa.detector import DetectorConfig

        try:
            DetectorConfig().use_backbone(backbone)
        except (VerticalsError, OSError, ValueError) as e:
            return f"backbone checkpoint not usable: {e}"
    return None
