"""Industrial QA tables: lines, model versions, inspections, defects, operator reviews.

Data contract:
  ``iqa_lines``           one production line / product (name unique), its target false-alarm rate
  ``iqa_model_versions``  versioned detectors per line (folder under ``model_dir("industrial_qa", line)``)
  ``iqa_inspections``     one row per image id (unique key: task re-runs update, never duplicate)
  ``iqa_defects``         connected regions of a rejected part's heatmap
  ``iqa_reviews``         an operator confirming or overturning a decision (labels for few-shot)
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, utcnow


class Line(Base):
    __tablename__ = "iqa_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    target_far: Mapped[float] = mapped_column(Float, default=0.01)
    drop_folder: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "iqa_model_versions"
    __table_args__ = (UniqueConstraint("line_id", "version", name="uq_iqa_model_versions_line_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    line_id: Mapped[int] = mapped_column(ForeignKey("iqa_lines.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))
    kind: Mapped[str] = mapped_column(String(32), default="unsupervised")
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Inspection(Base):
    __tablename__ = "iqa_inspections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    line_id: Mapped[int] = mapped_column(ForeignKey("iqa_lines.id", ondelete="CASCADE"), index=True)
    image_path: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | done | failed
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True)  # accept | reject
    defect_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    heatmap_path: Mapped[str | None] = mapped_column(String(500), nullable=True)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("iqa_model_versions.id", ondelete="SET NULL"), nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Defect(Base):
    __tablename__ = "iqa_defects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("iqa_inspections.id", ondelete="CASCADE"), index=True)
    defect_type: Mapped[str] = mapped_column(String(64), default="unknown")
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    area_fraction: Mapped[float] = mapped_column(Float)
    peak: Mapped[float] = mapped_column(Float)


class Review(Base):
    __tablename__ = "iqa_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("iqa_inspections.id", ondelete="CASCADE"), index=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    verdict: Mapped[str] = mapped_column(String(16))  # confirm | overturn
    label: Mapped[str] = mapped_column(String(16))    # good | defect (the operator's truth)
    defect_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
