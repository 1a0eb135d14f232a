"""The reading workflow on top of the database: ingest, draft, edit, sign, addendum, export.

Called by the Celery tasks, the CLI and the console (they stay thin). Every step is idempotent by
DICOM UID: de-identified UIDs are a keyed hash of the source UIDs, so ingesting the same files again
updates the same rows; drafting a study that already has an AI draft returns it unless forced.

Storage: ``VERTICALS_HOME/files/medical_imaging/studies/<study_uid>/<series_uid>/<sop_uid>.dcm`` holds
the de-identified DICOM; ``.../<study_uid>/reports/`` the exported SR, text and PDF.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.auth import User, audit_in, require_role
from core.db import session_scope, utcnow
from core.errors import DataError, VerticalsError
from core.settings import get_settings
from solutions.medical_imaging import dicom_io
from solutions.medical_imaging.deid import Deidentifier
from solutions.medical_imaging.orm import Instance, Patient, Report, ReportVersion, Series, Study, Upload

SOLUTION = "medical_imaging"


def storage_root() -> Path:
    p = get_settings().files_dir / SOLUTION / "studies"
    p.mkdir(parents=True, exist_ok=True)
    return p


def deidentifier() -> Deidentifier:
    key = hashlib.sha256(b"medical_imaging/deid/" + get_settings().secret_key.encode()).digest()
    # VERTICALS_MEDICAL_IMAGING_PSEUDONYM_MAP: keep the original -> pseudonym map (0600); unset: none kept.
    return Deidentifier(key=key, keep_map=get_settings().medical_imaging_pseudonym_map is not None)


def _save_pseudonym_map(d: Deidentifier) -> None:
    p = get_settings().medical_imaging_pseudonym_map
    if p is None or not d.pseudonym_map:
        return
    current = json.loads(p.read_text()) if p.exists() else {}
    current.update(d.pseudonym_map)
    p.write_text(json.dumps(current, indent=1))
    p.chmod(0o600)


# ------------------------------------------------------------------------------------------------
# Ingest
# ------------------------------------------------------------------------------------------------
@dataclass
class IngestSummary:
    upload_key: str
    n_files: int
    n_instances: int
    study_uids: list[str]
    errors: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _sc_instances(name: str, frames: np.ndarray, spacing: tuple[float, float], d: Deidentifier) -> list[Dataset]:
    """Wrap NIfTI/NRRD/PNG pixels as DICOM Secondary Capture (highdicom) so the workflow stays DICOM.

    UIDs derive from the file content, so re-ingesting the same file is idempotent.
    """
    import highdicom as hd

    digest = hashlib.sha256(frames.tobytes()).hexdigest()
    study_uid, series_uid = d.remap_uid("study:" + digest), d.remap_uid("series:" + digest)
    lo, hi = float(frames.min()), float(frames.max())
    scaled = ((frames - lo) / max(hi - lo, 1e-6) * 4095).astype(np.uint16)
    out: list[Dataset] = []
    for i, frame in enumerate(scaled):
        ds = hd.sc.SCImage(
            pixel_array=frame, photometric_interpretation="MONOCHROME2", bits_allocated=16,
            coordinate_system="PATIENT", study_instance_uid=study_uid, series_instance_uid=series_uid,
            series_number=1, sop_instance_uid=d.remap_uid(f"sop:{digest}:{i}"), instance_number=i + 1,
            manufacturer="Verticals import", patient_id=d.pseudonym("import:" + digest),
            patient_name=d.pseudonym("import:" + digest), patient_orientation=("L", "P"),
            pixel_spacing=spacing, study_id="", accession_number="", referring_physician_name="")
        ds.SeriesDescription = f"imported {Path(name.split(':')[-1]).suffix.lstrip('.') or 'image'}"
        ds.ImageComments = ""
        out.append(ds)
    return out


def _non_dicom(scan: dicom_io.ScanResult, d: Deidentifier) -> list[dicom_io.ParsedInstance]:
    insts: list[dicom_io.ParsedInstance] = []
    for path in scan.key_images:
        try:
            img = dicom_io.load_key_image(path)
            insts += [dicom_io.ParsedInstance(path, ds, img[None]) for ds in _sc_instances(path, img[None], (1.0, 1.0), d)]
        except DataError as e:
            scan.errors.append(dicom_io.FileError(path, str(e)))
    for path in scan.volumes:
        try:
            vol = dicom_io.load_volume(path, axcodes="RAS")
            sp = dicom_io.volume_spacing(vol)
            arr = np.asarray(vol[0], dtype=np.float32).transpose(2, 1, 0)[::-1]  # (Z, Y, X), superior first
            for ds, frame in zip(_sc_instances(path, arr, (sp[1], sp[0]), d), arr, strict=True):
                ds.SliceThickness = sp[2]
                insts.append(dicom_io.ParsedInstance(path, ds, frame[None]))
        except DataError as e:
            scan.errors.append(dicom_io.FileError(path, str(e)))
    return insts


def ingest_workers() -> int:
    """Processes that parse, de-identify and write DICOM files in parallel during ingest.

    ``VERTICALS_MEDICAL_IMAGING_INGEST_WORKERS`` (default 1: in-process). On the shared 2-core VM at
    load ~14, 2 workers gave 0.8-1.05x the in-process rate (the busy machine shares CPU per session, and
    the workers cost ~20 % more CPU in pickling); set it to the free cores on a dedicated ingest host.
    Inside a daemonic process (a pool child that may not fork) ingest always stays in-process.
    """
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return 1
    return get_settings().medical_imaging_ingest_workers


PARALLEL_MIN_FILES = 16  # below this, starting worker processes costs more than it saves
_BATCH = 256  # sources in flight at once (zip members are held in memory until processed)


def _store_target(root: Path, inst: dicom_io.ParsedInstance) -> Path:
    return root / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"


_made_dirs: set[Path] = set()


def _prepare_dicom(job: tuple[str, bytes | Path, bytes, bool, str],
                   d: Deidentifier | None = None) -> tuple[Any, dict[str, str]]:
    """One DICOM source: parse (native pixels validated, not decoded), de-identify in place, write the
    de-identified file to its storage path. Returns the instance (in a worker process: without its
    pixel data, which nothing after this step needs) or a FileError, and the pseudonym map entries.
    ``d``: the caller's de-identifier when run in-process."""
    name, src, key, keep_map, root = job
    in_worker = d is None
    d = d or Deidentifier(key=key, keep_map=keep_map)
    try:
        inst = dicom_io.parse_instance(src, name, decode=False)
    except DataError as e:
        return dicom_io.FileError(name, str(e), getattr(e, "study_uid", "")), {}
    d(inst.dataset)
    target = _store_target(Path(root), inst)
    if target.parent not in _made_dirs or not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _made_dirs.add(target.parent)
    inst.dataset.save_as(target, enforce_file_format=True)
    if not in_worker:
        return dicom_io.ParsedInstance(str(target), inst.dataset, None), {}
    ds = inst.dataset
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            delattr(ds, kw)  # ParsedInstance.shape reads Rows/Columns/NumberOfFrames from the header
    return (dicom_io.ParsedInstance(str(target), ds, None), d.pseudonym_map)


def _scan_deid_store(path: str | Path, d: Deidentifier, root: Path, workers: int) -> dicom_io.ScanResult:
    """Every source under ``path``: DICOM parsed, de-identified and written to storage (in ``workers``
    processes when there are enough files); volumes and key images listed for :func:`_non_dicom`.
    The returned DICOM instances carry their stored path and no pixel data."""
    import itertools
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    out = dicom_io.ScanResult()
    sources = dicom_io.iter_sources(path)
    pool: ProcessPoolExecutor | None = None
    try:
        while batch := list(itertools.islice(sources, _BATCH)):
            jobs = []
            for name, src in batch:
                kind = dicom_io.source_kind(name, src)
                if isinstance(kind, dicom_io.FileError):
                    out.errors.append(kind)
                elif kind == "volume":
                    out.volumes.append(name)
                elif kind == "key_image":
                    out.key_images.append(name)
                elif not isinstance(src, dicom_io.FileError):
                    jobs.append((name, src, d.key, d.keep_map, str(root)))
            if pool is None and workers > 1 and len(jobs) >= PARALLEL_MIN_FILES:
                import multiprocessing

                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            try:
                results = (list(pool.map(_prepare_dicom, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
                           if pool is not None else [_prepare_dicom(j, d) for j in jobs])
            except BrokenProcessPool:  # a worker died (e.g. out of memory): finish this batch in-process
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                pool, workers = None, 1
                results = [_prepare_dicom(j, d) for j in jobs]
            for res, pseudonyms in results:
                if isinstance(res, dicom_io.FileError):
                    out.errors.append(res)
                else:
                    out.instances.append(res)
                    d.pseudonym_map.update(pseudonyms)
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def ingest_path(path: str | Path, upload_key: str | None = None, history: str = "",
                priority: str = "routine", username: str = "system", workers: int | None = None) -> IngestSummary:
    """Read, de-identify, store and register every image under ``path``; bad files become errors.

    ``workers``: processes for parse + de-identify + write (default :func:`ingest_workers`)."""
    d = deidentifier()
    key = upload_key or "path:" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    root = storage_root()
    scan = _scan_deid_store(path, d, root, ingest_workers() if workers is None else workers)
    n_files = len(scan.instances) + len(scan.volumes) + len(scan.key_images) + len(scan.errors)
    source_kind = {id(i): "dicom" for i in scan.instances}
    extra = _non_dicom(scan, d)
    for inst in extra:
        source_kind[id(inst)] = "volume" if inst.path.lower().endswith(dicom_io.VOLUME_SUFFIXES) else "key_image"
    studies = dicom_io.group_instances(scan.instances + extra)
    _save_pseudonym_map(d)
    # Errors whose header was readable name their (de-identified) study so the console shows them there.
    study_errors: dict[str, list[str]] = {}
    for e in scan.errors:
        if e.study_uid:
            study_errors.setdefault(d.remap_uid(e.study_uid), []).append(e.reason)
    uids: list[str] = []
    with session_scope() as s:
        for st in studies:
            first = next(iter(st.series.values())).instances[0]
            kind = source_kind.get(id(first), "dicom")
            study = _upsert_study(s, st, first.dataset, root, kind, history, priority)
            errs = study_errors.pop(st.uid, [])
            study.error = "; ".join(errs)[:4000] if errs else None
            uids.append(st.uid)
            for se in st.series.values():
                _upsert_series(s, study, se, root / st.uid)
            study.n_series = len(study.series)
            study.n_instances = sum(x.n_instances for x in study.series)
            study.modality = ",".join(sorted({x.modality for x in study.series}))
        for uid, errs in study_errors.items():  # every file of that study failed
            study = s.scalar(select(Study).where(Study.study_uid == uid)) or Study(study_uid=uid, storage_path="")
            s.add(study)
            study.status, study.error = "failed", "; ".join(errs)[:4000]
            uids.append(uid)
        up = s.scalar(select(Upload).where(Upload.key == key)) or Upload(key=key)
        s.add(up)
        up.source, up.n_files = str(path), n_files
        up.n_ok = n_files - len(scan.errors)
        up.study_uids = sorted(set(uids))
        up.errors = [{"file": e.path, "reason": e.reason} for e in scan.errors]
        up.status = "done" if not scan.errors else ("partial" if up.n_ok else "failed")
        audit_in(s, username, "ingest", SOLUTION, target=key,
                 detail={"files": n_files, "errors": len(scan.errors), "studies": up.study_uids})
    return IngestSummary(key, n_files, sum(st.n_instances for st in studies), sorted(set(uids)),
                         [{"file": e.path, "reason": e.reason} for e in scan.errors])


def _upsert_study(s: Session, st: dicom_io.StudyGroup, ds: Dataset, root: Path, kind: str, history: str,
                  priority: str) -> Study:
    patient = s.scalar(select(Patient).where(Patient.pseudonym == str(ds.PatientID)))
    if patient is None:
        patient = Patient(pseudonym=str(ds.PatientID))
        s.add(patient)
    patient.sex, patient.age = str(ds.get("PatientSex", "") or ""), str(ds.get("PatientAge", "") or "")
    study = s.scalar(select(Study).where(Study.study_uid == st.uid))
    if study is None:
        study = Study(study_uid=st.uid, history=history, priority=priority)
        s.add(study)
    elif history:
        study.history = history
    study.patient = patient
    study.source = kind
    study.study_date = str(ds.get("StudyDate", "") or "")
    study.body_part = str(ds.get("BodyPartExamined", "") or "")
    study.storage_path = str(root / st.uid)
    if study.status == "failed":
        study.status = "ingested"
    s.flush()
    return study


def _upsert_series(s: Session, study: Study, se: dicom_io.SeriesGroup, folder: Path) -> None:
    series = s.scalar(select(Series).where(Series.series_uid == se.uid))
    if series is None:
        series = Series(series_uid=se.uid, study=study)
        s.add(series)
    sdir = folder / se.uid
    sdir.mkdir(parents=True, exist_ok=True)
    first = se.instances[0]
    series.modality, series.plane = se.modality, se.plane
    series.rows, series.cols = first.shape[-2], first.shape[-1]
    series.spacing = list(se.spacing())
    series.storage_path = str(sdir)
    s.flush()
    existing = {i.sop_uid: i for i in s.scalars(
        select(Instance).where(Instance.sop_uid.in_([x.sop_uid for x in se.instances])))}
    for idx, inst in enumerate(se.instances):
        target = sdir / f"{inst.sop_uid}.dcm"
        if inst.path != str(target):  # DICOM sources were written by _prepare_dicom already
            inst.dataset.save_as(target, enforce_file_format=True)
        row = existing.get(inst.sop_uid)
        if row is None:
            row = Instance(sop_uid=inst.sop_uid, series=series, path=str(target))
            s.add(row)
        row.instance_number = int(inst.dataset.get("InstanceNumber", idx + 1) or idx + 1)
        pos = dicom_io.slice_position(inst.dataset)
        row.position = float(pos) if pos is not None else float(idx)
        row.n_frames = inst.shape[0]
        row.path = str(target)
    s.flush()
    series.n_instances = len(s.scalars(select(Instance.id).where(Instance.series_id == series.id)).all())


# ------------------------------------------------------------------------------------------------
# Reading a stored study back
# ------------------------------------------------------------------------------------------------
def get_study(s: Session, study_uid: str) -> Study:
    study = s.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise DataError(f"no study with UID {study_uid}")
    return study


def series_slices(series_id: int) -> tuple[np.ndarray, Dataset]:
    """(Z, H, W) float32 in modality units for a stored series, plus the first header."""
    with session_scope() as s:
        paths = [i.path for i in s.scalars(select(Instance).where(Instance.series_id == series_id)
                                           .order_by(Instance.position, Instance.instance_number))]
    if not paths:
        raise DataError(f"series {series_id} has no stored instances")
    insts = [dicom_io.parse_instance(p) for p in paths]
    frames = [f for i in insts for f in i.pixels]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        frames = [f for f in frames if f.shape == frames[0].shape]
    return np.stack(frames), insts[0].dataset


def key_slice(study_uid: str) -> tuple[np.ndarray, str, str]:
    """The middle slice of the study's largest series, windowed for display, its plane and modality."""
    with session_scope() as s:
        study = get_study(s, study_uid)
        if not study.series:
            raise DataError(f"study {study_uid} has no readable images ({study.error or 'nothing stored'})")
        series = max(study.series, key=lambda x: x.n_instances)
        sid, plane, modality = series.id, series.plane, series.modality
    vol, ds = series_slices(sid)
    img = vol[len(vol) // 2]
    center, width = dicom_io.default_window(ds, img)
    return dicom_io.apply_window(img, center, width).astype(np.float32), plane, modality


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------
def _report(s: Session, study: Study) -> Report:
    rep = s.scalar(select(Report).where(Report.study_id == study.id))
    if rep is None:
        rep = Report(study_id=study.id)
        s.add(rep)
        s.flush()
    return rep


def _next_version(s: Session, rep: Report) -> int:
    return max((v.version for v in rep.versions), default=0) + 1


def latest_version(study_uid: str) -> ReportVersion | None:
    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = s.scalar(select(Report).where(Report.study_id == study.id))
        return rep.versions[-1] if rep is not None and rep.versions else None


def report_history(study_uid: str) -> list[ReportVersion]:
    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = s.scalar(select(Report).where(Report.study_id == study.id))
        return list(rep.versions) if rep is not None else []


def draft_study(study_uid: str, reporter: Any, force: bool = False) -> ReportVersion:
    """Store the AI draft for a study (idempotent: an existing AI draft is returned unless ``force``)."""
    from solutions.medical_imaging.data import NATIVE_SIZE, to_model_input
    from solutions.medical_imaging.fusion import clinical_text

    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = _report(s, study)
        existing = [v for v in rep.versions if v.kind == "ai_draft"]
        if existing and not force:
            return existing[-1]
        if rep.status != "draft":
            raise VerticalsError(f"study {study_uid} is already signed; drafting again is not allowed")
        history = study.history
        sex, age = (study.patient.sex, study.patient.age) if study.patient is not None else ("", "")
    img, plane, modality = key_slice(study_uid)
    hint = modality.split(",")[0] if modality.split(",")[0] in ("CT", "MR") else None
    draft = reporter.draft_batch(to_model_input(img, reporter.cfg.image_size)[None], [history], [plane],
                                 [hint], requests=[clinical_text(history or "", sex or "", age or "", plane)],
                                 full_images=[to_model_input(img, NATIVE_SIZE, canvas=False)])[0]
    details = {k: getattr(draft, k) for k in ("decoder_text", "prior_report", "modality", "modality_conf", "modality_source",
                                              "region", "region_conf", "plane",
                                              "category", "category_conf", "abnormal_prob", "similar")}
    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = _report(s, study)
        v = ReportVersion(report=rep, version=_next_version(s, rep), kind="ai_draft", findings=draft.findings,
                          impression=draft.impression, author="ai", details=details)
        s.add(v)
        study.status = "drafted"
        audit_in(s, "system", "report.draft", SOLUTION, target=study_uid, detail={"version": v.version})
    return v


def save_edit(study_uid: str, user: User, findings: str, impression: str) -> ReportVersion:
    require_role(user, "radiologist")
    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = _report(s, study)
        if rep.status != "draft":
            raise VerticalsError("the report is signed; it cannot be edited; add an addendum instead")
        v = ReportVersion(report=rep, version=_next_version(s, rep), kind="edit", findings=findings,
                          impression=impression, author=user.username)
        s.add(v)
        study.status = "in_review"
        audit_in(s, user.username, "report.edit", SOLUTION, target=study_uid, detail={"version": v.version})
    return v


def sign_report(study_uid: str, user: User, findings: str, impression: str) -> ReportVersion:
    """Sign (radiologist or admin): a new immutable version; the study becomes 'signed'."""
    require_role(user, "radiologist")
    if not findings.strip() and not impression.strip():
        raise VerticalsError("cannot sign an empty report")
    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = _report(s, study)
        if rep.status != "draft":
            raise VerticalsError("the report is already signed; add an addendum instead")
        v = ReportVersion(report=rep, version=_next_version(s, rep), kind="signed", findings=findings,
                          impression=impression, author=user.username, signed=True, signed_at=utcnow())
        s.add(v)
        rep.status, study.status = "signed", "signed"
        audit_in(s, user.username, "report.sign", SOLUTION, target=study_uid, detail={"version": v.version})
    return v


def add_addendum(study_uid: str, user: User, text: str) -> ReportVersion:
    """An addendum to a signed report: a new signed version that carries the signed text plus the addendum."""
    require_role(user, "radiologist")
    if not text.strip():
        raise VerticalsError("the addendum is empty")
    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = _report(s, study)
        signed = [v for v in rep.versions if v.signed]
        if not signed:
            raise VerticalsError("only a signed report takes an addendum; sign the report first")
        last = signed[-1]
        v = ReportVersion(report=rep, version=_next_version(s, rep), kind="addendum",
                          findings=last.findings + f"\n\nADDENDUM ({user.username}, {utcnow():%Y-%m-%d %H:%M} UTC): "
                          + text.strip(), impression=last.impression, author=user.username, signed=True,
                          signed_at=utcnow(), details={"addendum": text.strip(), "amends": last.version})
        s.add(v)
        rep.status, study.status = "amended", "amended"
        audit_in(s, user.username, "report.addendum", SOLUTION, target=study_uid, detail={"version": v.version})
    return v


def export_report(study_uid: str, out_dir: str | Path | None = None) -> dict[str, str]:
    """Write the latest signed version as DICOM SR, text and PDF. Returns the file paths."""
    from solutions.medical_imaging.sr import ReportContent, build_sr, report_text, write_pdf

    with session_scope() as s:
        study = get_study(s, study_uid)
        rep = s.scalar(select(Report).where(Report.study_id == study.id))
        signed = [v for v in rep.versions if v.signed] if rep else []
        if not signed:
            raise VerticalsError(f"study {study_uid} has no signed report to export")
        v = signed[-1]
        content = ReportContent(findings=v.findings, impression=v.impression, signed_by=v.author, version=v.version)
        paths = [i.path for se in study.series for i in se.instances]
        header = {"Study UID": study.study_uid, "Patient (pseudonym)": study.patient.pseudonym if study.patient else "",
                  "Modality": study.modality, "Study date (shifted)": study.study_date}
        folder = Path(out_dir) if out_dir else Path(study.storage_path) / "reports"
    if not paths:
        raise VerticalsError(f"study {study_uid} has no stored DICOM instances to reference")
    folder.mkdir(parents=True, exist_ok=True)
    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    d = deidentifier()
    previous = folder / f"sr_v{signed[-2].version}.dcm" if len(signed) > 1 else None
    sr = build_sr(content, evidence, series_instance_uid=d.remap_uid(f"sr-series:{study_uid}"),
                  sop_instance_uid=d.remap_uid(f"sr:{study_uid}:{v.version}"),
                  previous_versions=[pydicom.dcmread(previous)] if previous is not None and previous.exists() else None)
    sr_path = folder / f"sr_v{v.version}.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    txt = folder / f"report_v{v.version}.txt"
    txt.write_text(report_text(content, header))
    pdf = write_pdf(content, folder / f"report_v{v.version}.pdf", header)
    with session_scope() as s:
        audit_in(s, "system", "report.export", SOLUTION, target=study_uid, detail={"version": v.version})
    return {"sr": str(sr_path), "text": str(txt), "pdf": str(pdf)}
