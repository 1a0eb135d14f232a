"""De-identification on ingest: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile
with the *Retain Longitudinal Temporal Information with Modified Dates* and *Retain Patient
Characteristics* options.

Named input: a pydicom Dataset straight from the modality (PHI included) and a secret key.
Named output: the same Dataset, changed in place: identifying attributes removed, emptied or replaced
by a pseudonym, every date shifted by a per-patient offset (so intervals between a patient's studies
survive), every instance UID remapped deterministically (the same source UID always maps to the same
new UID, so re-ingesting a study is idempotent and references stay consistent), private tags removed.

Pseudonyms are keyed HMAC-SHA256 of the original Patient ID: nobody without the key can recompute
them, and the original -> pseudonym map is only kept when ``keep_map`` is set (a site that must be able
to re-identify, e.g. to report incidental findings, configures it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, UID_dictionary

# PS3.15 Table E.1-1 (basic profile), attributes an image header commonly carries. Action codes:
# X remove, Z replace by empty (type 2 kept present), D replace by a dummy/pseudonym.
REMOVE: tuple[str, ...] = (
    "AdmittingDiagnosesDescription", "AdditionalPatientHistory", "AdmissionID",
    "Allergies", "BranchOfService", "ConsultingPhysicianName", "CountryOfResidence", "CurrentPatientLocation",
    "DerivationDescription", "DeviceSerialNumber", "EthnicGroup", "FillerOrderNumberImagingServiceRequest",
    "ImageComments", "InstitutionAddress", "InstitutionName", "InstitutionalDepartmentName",
    "IssuerOfPatientID", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank", "NameOfPhysiciansReadingStudy",
    "Occupation", "OperatorsName", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientAddress", "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName", "PatientReligiousPreference", "PatientState", "PatientTelephoneNumbers",
    "PerformedProcedureStepDescription", "PerformedProcedureStepID", "PerformingPhysicianName",
    "PhysiciansOfRecord", "PlacerOrderNumberImagingServiceRequest", "PregnancyStatus", "ProtocolName",
    "ReasonForStudy", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "RequestAttributesSequence",
    "RequestingPhysician", "RequestingService", "RequestedProcedureDescription", "RequestedProcedureID",
    "ResponsiblePerson", "ResponsibleOrganization", "ScheduledProcedureStepDescription", "SeriesDescription",
    "SmokingStatus", "SpecialNeeds", "StationName", "StudyComments", "StudyDescription",
    "OperatorIdentificationSequence", "PerformingPhysicianIdentificationSequence",
    "ReferringPhysicianIdentificationSequence", "PhysiciansOfRecordIdentificationSequence",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ProcedureCodeSequence", "RequestedProcedureCodeSequence",
    "VisitComments",
)
# Type-2 attributes of the patient/study modules: present but empty afterwards (Z).
EMPTY: tuple[str, ...] = ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate")
# Kept under the Retain Patient Characteristics option: PatientSex, PatientAge, PatientSize, PatientWeight.
# UIDs that name classes/syntaxes (not instances) are never remapped.
KEEP_UIDS: tuple[str, ...] = ("SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                              "ImplementationClassUID", "ReferencedSOPClassUID", "CodingSchemeUID",
                              "ContextGroupExtensionCreatorUID", "MappingResourceUID")
# VRs that can carry an identifier or a date; everything else is left in its raw (unparsed) form.
_ID_VRS = frozenset({"UI", "DA", "DT", "PN", "SQ"})
_PATIENT_ID = Tag(0x0010, 0x0020)
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): no registered root needed
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
                ("113108", "Retain Patient Characteristics Option"))


@dataclass
class Deidentifier:
    """Applies the profile with a secret ``key``; ``keep_map`` retains original -> pseudonym pairs."""

    key: bytes
    keep_map: bool = False
    max_shift_days: int = 3650
    pseudonym_map: dict[str, str] = field(default_factory=dict)

    def _hmac(self, *parts: str) -> bytes:
        return hmac.new(self.key, "\x1f".join(parts).encode("utf-8"), hashlib.sha256).digest()

    def pseudonym(self, patient_id: str) -> str:
        """Stable pseudonymous patient ID (``ANON-`` + 12 hex) for an original Patient ID."""
        return "ANON-" + self._hmac("patient", patient_id).hex()[:12].upper()

    def date_shift_days(self, patient_id: str) -> int:
        """Per-patient shift, between 1 and ``max_shift_days`` days into the past."""
        return -(1 + int.from_bytes(self._hmac("date", patient_id)[:4], "big") % self.max_shift_days)

    def remap_uid(self, uid: str) -> str:
        """Deterministic replacement for an instance UID (2.25.<128-bit int>, < 64 chars)."""
        return UID_ROOT + str(int.from_bytes(self._hmac("uid", uid)[:16], "big"))

    # --------------------------------------------------------------------------------------------
    def __call__(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place and return it."""
        original_id = str(ds.get("PatientID", "") or "") or str(ds.get("PatientName", "") or "") or "unknown"
        pseudo = self.pseudonym(original_id)
        shift = dt.timedelta(days=self.date_shift_days(original_id))
        if self.keep_map:
            self.pseudonym_map[original_id] = pseudo

        for kw in REMOVE:
            if kw in ds:
                delattr(ds, kw)
        for kw in EMPTY:
            setattr(ds, kw, "")
        if "ContentCreatorName" in ds:
            ds.ContentCreatorName = ""
        ds.PatientID = pseudo
        ds.PatientName = pseudo
        self._walk(ds, shift)  # also drops private tags, at every nesting level
        if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = UID(self.remap_uid(str(ds.file_meta.MediaStorageSOPInstanceUID)))
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "PS3.15 E.1 basic; dates shifted; UIDs remapped"  # LO: <= 64 chars
        seq = []
        for value, meaning in METHOD_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            seq.append(item)
        ds.DeidentificationMethodCodeSequence = seq
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        return ds

    def _walk(self, ds: Dataset, shift: dt.timedelta) -> None:
        """Remove private tags and apply :meth:`_element` to UI/DA/DT/PN values, recursing into sequences.

        Only elements whose VR can carry an identifier are converted from their raw bytes (pydicom's
        ``walk`` converts every element, which was the most expensive step of ingest).
        """
        for tag in list(ds.keys()):
            if tag.is_private:
                del ds[tag]
                continue
            vr = getattr(ds.get_item(tag), "VR", None)
            if vr in (None, "UN"):  # implicit VR little endian, or unknown: the dictionary knows
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = None
            if vr is not None and vr not in _ID_VRS and tag != _PATIENT_ID:
                continue
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self._walk(item, shift)
            else:
                self._element(ds, elem, shift)

    def _element(self, _ds: Dataset, elem: DataElement, shift: dt.timedelta) -> None:
        if elem.value in (None, ""):
            return
        if elem.VR == "UI":
            if elem.keyword in KEEP_UIDS:
                return
            vals = elem.value if elem.VM > 1 else [elem.value]
            new = [v if str(v) in UID_dictionary else self.remap_uid(str(v)) for v in vals]
            elem.value = new if elem.VM > 1 else new[0]
        elif elem.VR == "DA":
            elem.value = _shift_da(elem.value, shift)
        elif elem.VR == "DT":
            elem.value = _shift_dt(str(elem.value), shift)
        elif elem.VR == "PN" and elem.keyword not in ("PatientName",):
            elem.value = ""  # any other person name (e.g. in sequences): basic profile Z/X
        elif elem.keyword in ("PatientID",) and elem.tag.group != 0x0010:
            elem.value = ""


def _shift_da(value: object, shift: dt.timedelta) -> object:
    def one(v: str) -> str:
        v = str(v).strip()
        try:
            return (dt.datetime.strptime(v[:8], "%Y%m%d") + shift).strftime("%Y%m%d")
        except ValueError:
            return ""  # unparseable date: drop it rather than keep a possibly identifying value

    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str):
        return [one(str(v)) for v in value]  # type: ignore[union-attr]
    return one(str(value))


def _shift_dt(value: str, shift: dt.timedelta) -> str:
    v = value.strip()
    try:
        base = dt.datetime.strptime(v[:8], "%Y%m%d") + shift
    except ValueError:
        return ""
    return base.strftime("%Y%m%d") + v[8:]


def phi_values(ds: Dataset) -> list[str]:
    """Identifying strings present in a source header (used by tests and the ingest audit)."""
    out = []
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
               "AccessionNumber", "OperatorsName", "StudyID", "InstitutionAddress", "PerformingPhysicianName"):
        v = str(ds.get(kw, "") or "").strip()
        if len(v) >= 3:
            out.append(v)
    return out
