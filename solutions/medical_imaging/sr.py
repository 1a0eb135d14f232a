"""Signed reports out: DICOM Comprehensive SR (TID 2000-style basic diagnostic imaging report), text, PDF.

Named input: :class:`ReportContent` (findings, impression, signer, version) and the de-identified
source image headers of the study (the SR inherits patient/study attributes from them and lists them
in CurrentRequestedProcedureEvidenceSequence, so the SR references the source study).
Named output: a highdicom ``ComprehensiveSR`` Dataset; :func:`read_sr` turns any such file back into
plain sections with pydicom alone.

Content tree (PS3.16 TID 2000 "Basic Diagnostic Imaging Report"):
  CONTAINER (LN 18748-4 "Diagnostic imaging report")
    HAS CONCEPT MOD  CODE  (DCM 121049 "Language of Content Item and Descendants") = English
    CONTAINS CONTAINER (DCM 121070 "Findings")    CONTAINS TEXT (DCM 121071 "Finding")
    CONTAINS CONTAINER (DCM 121072 "Impressions") CONTAINS TEXT (DCM 121073 "Impression")
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from core.errors import DataError

REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
FINDINGS_SECTION = Code("121070", "DCM", "Findings")
FINDING = Code("121071", "DCM", "Finding")
IMPRESSIONS_SECTION = Code("121072", "DCM", "Impressions")
IMPRESSION = Code("121073", "DCM", "Impression")
LANGUAGE = Code("121049", "DCM", "Language of Content Item and Descendants")
ENGLISH = Code("en-US", "RFC5646", "English (United States)")


@dataclass(frozen=True)
class ReportContent:
    findings: str
    impression: str
    signed_by: str = ""
    organization: str = "Verticals radiology"
    version: int = 1
    title: str = "Diagnostic imaging report"


def build_sr(
    report: ReportContent,
    evidence: Sequence[Dataset],
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    previous_versions: Sequence[Dataset] | None = None,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR of ``report`` referencing the ``evidence`` images (all from one study)."""
    if not evidence:
        raise DataError("an SR needs at least one DICOM source image of the study to reference")
    studies = {str(d.StudyInstanceUID) for d in evidence}
    if len(studies) != 1:
        raise DataError(f"SR evidence must come from one study, got {len(studies)}")
    if not report.findings.strip() and not report.impression.strip():
        raise DataError("the report is empty: write findings or an impression before exporting")

    def text(name: Code, value: str) -> hd.sr.TextContentItem:
        return hd.sr.TextContentItem(name=name, value=value.strip() or "None.",
                                     relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)

    def section(name: Code, item_name: Code, value: str) -> hd.sr.ContainerContentItem:
        c = hd.sr.ContainerContentItem(name=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        c.ContentSequence = hd.sr.ContentSequence([text(item_name, value)])
        return c

    lang = hd.sr.CodeContentItem(name=LANGUAGE, value=ENGLISH,
                                 relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence([
        lang,
        section(FINDINGS_SECTION, FINDING, report.findings),
        section(IMPRESSIONS_SECTION, IMPRESSION, report.impression),
    ])
    signed = bool(report.signed_by)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=root,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=900 + min(report.version, 99),
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=report.version,
        manufacturer="Verticals",
        is_complete=True,
        is_final=signed,
        is_verified=signed,
        verifying_observer_name=report.signed_by or None,
        verifying_organization=report.organization if signed else None,
        previous_versions=list(previous_versions) if previous_versions else None,
    )
    sr.SeriesDescription = f"{report.title} v{report.version}"
    return sr


def read_sr(source: str | Path | Dataset) -> dict[str, str]:
    """Sections of a TID 2000-style SR read back with pydicom: findings, impression, status, study UID."""
    try:
        ds = source if isinstance(source, Dataset) else pydicom.dcmread(str(source))
    except Exception as e:
        raise DataError(f"{source}: not a readable DICOM SR ({e})") from None
    if "ContentSequence" not in ds:
        raise DataError(f"{source}: DICOM object has no SR content tree")
    out: dict[str, list[str]] = {"findings": [], "impression": []}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        key = {"121070": "findings", "121072": "impression"}.get(name)
        if key is None:
            continue
        for child in item.get("ContentSequence", []):
            if child.ValueType == "TEXT":
                out[key].append(str(child.TextValue))
    title = ds.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in ds else ""
    return {
        "title": str(title),
        "findings": "\n".join(out["findings"]),
        "impression": "\n".join(out["impression"]),
        "completion": str(ds.get("CompletionFlag", "")),
        "verification": str(ds.get("VerificationFlag", "")),
        "verifier": str(ds.VerifyingObserverSequence[0].VerifyingObserverName)
        if "VerifyingObserverSequence" in ds else "",
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "referenced_series": ",".join(
            str(se.SeriesInstanceUID)
            for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for se in st.get("ReferencedSeriesSequence", [])),
    }


def report_text(report: ReportContent, header: dict[str, str] | None = None) -> str:
    """The plain-text rendering of a report (what the PDF shows too)."""
    lines = [report.title.upper(), ""]
    for k, v in (header or {}).items():
        lines.append(f"{k}: {v}")
    if header:
        lines.append("")
    lines += ["FINDINGS:", report.findings.strip() or "None.", "", "IMPRESSION:", report.impression.strip() or "None.", ""]
    lines.append(f"Signed by: {report.signed_by} (version {report.version})" if report.signed_by
                 else f"UNSIGNED DRAFT (version {report.version})")
    return "\n".join(lines) + "\n"


def write_pdf(report: ReportContent, path: str | Path, header: dict[str, str] | None = None) -> Path:
    """A one-page A4 PDF of the report (matplotlib's PDF backend; long text wraps, overflow pages follow)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    wrapped: list[str] = []
    for line in report_text(report, header).splitlines():
        wrapped += textwrap.wrap(line, 95) or [""]
    per_page = 60
    path = Path(path)
    with PdfPages(path) as pdf:
        for start in range(0, max(len(wrapped), 1), per_page):
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.07, 0.95, "\n".join(wrapped[start:start + per_page]), va="top", ha="left",
                     family="monospace", fontsize=8.5)
            pdf.savefig(fig)
            plt.close(fig)
    return path
