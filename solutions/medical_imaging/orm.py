"""Tables of the medical-imaging solution (pseudonymous by construction: rows hold de-identified values only).

patients 1-n studies 1-n series 1-n instances; studies 1-1 reports 1-n report_versions; uploads record
each ingest (files read, per-file errors). Audit events go to the core ``audit_events`` table with
``solution='medical_imaging'``.

A signed report version is immutable: a ``before_flush`` hook refuses any change to or deletion of a
signed version; corrections are new versions (an addendum).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    inspect,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from core.db import Base, utcnow
from core.errors import VerticalsError

STUDY_STATUSES = ("ingested", "drafted", "in_review", "signed", "amended", "failed")
VERSION_KINDS = ("ai_draft", "edit", "signed", "addendum")


class SignedReportImmutable(VerticalsError):
    """Raised on any attempt to change a signed report version."""


class Patient(Base):
    __tablename__ = "mi_patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sex: Mapped[str] = mapped_column(String(16), default="")
    age: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "mi_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("mi_patients.id"), index=True, nullable=True)
    modality: Mapped[str] = mapped_column(String(32), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(16), default="")  # shifted by de-identification
    source: Mapped[str] = mapped_column(String(16), default="dicom")  # dicom | volume | key_image
    status: Mapped[str] = mapped_column(String(16), default="ingested", index=True)
    priority: Mapped[str] = mapped_column(String(16), default="routine")
    history: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_series: Mapped[int] = mapped_column(Integer, default=0)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    storage_path: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    patient: Mapped[Patient | None] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "mi_series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("mi_studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    plane: Mapped[str] = mapped_column(String(16), default="unknown")
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    cols: Mapped[int] = mapped_column(Integer, default=0)
    spacing: Mapped[list[float]] = mapped_column(JSON, default=list)  # (z, y, x) mm
    storage_path: Mapped[str] = mapped_column(String(500), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.position")


class Instance(Base):
    __tablename__ = "mi_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("mi_series.id", ondelete="CASCADE"), index=True)
    instance_number: Mapped[int] = mapped_column(Integer, default=0)
    position: Mapped[float] = mapped_column(Float, default=0.0)  # sort key along the slice normal
    n_frames: Mapped[int] = mapped_column(Integer, default=1)
    path: Mapped[str] = mapped_column(String(500))

    series: Mapped[Series] = relationship(back_populates="instances")


class Upload(Base):
    """One ingest run (a dropped folder, zip or file); keyed so a re-delivered task updates it."""

    __tablename__ = "mi_uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    source: Mapped[str] = mapped_column(String(500), default="")
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|done|partial|failed
    n_files: Mapped[int] = mapped_column(Integer, default=0)
    n_ok: Mapped[int] = mapped_column(Integer, default=0)
    study_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Report(Base):
    __tablename__ = "mi_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("mi_studies.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")  # draft | signed | amended
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    versions: Mapped[list[ReportVersion]] = relationship(back_populates="report", order_by="ReportVersion.version")


class ReportVersion(Base):
    """Append-only history of a report: the AI draft, each edit, the signed text and addenda."""

    __tablename__ = "mi_report_versions"
    __table_args__ = (UniqueConstraint("report_id", "version", name="uq_mi_report_versions_report_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("mi_reports.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # one of VERSION_KINDS
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(100), default="system")
    signed: Mapped[bool] = mapped_column(Boolean, default=False)
    signed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # confidences, similar cases, SR uid
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    report: Mapped[Report] = relationship(back_populates="versions")


@event.listens_for(Session, "before_flush")
def _refuse_signed_changes(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if not isinstance(obj, ReportVersion):
            continue
        state = inspect(obj)
        was_signed = state.attrs.signed.history.deleted or [obj.signed]
        if any(was_signed):
            if obj in session.deleted:
                raise SignedReportImmutable(f"report version {obj.version} is signed and cannot be deleted")
            changed = [a.key for a in state.attrs if a.key != "report" and a.history.has_changes()]
            if changed:
                raise SignedReportImmutable(
                    f"report version {obj.version} is signed and cannot be changed ({', '.join(changed)}); "
                    "add an addendum instead")
