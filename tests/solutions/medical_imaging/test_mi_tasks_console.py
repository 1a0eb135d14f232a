"""Celery tasks through a real worker (idempotency, bad input) and the console pages via AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest
from mi_helpers import dicom_testfile as dcm_file
from sqlalchemy import func, select

from core.db import session_scope
from solutions.medical_imaging.orm import Instance, ReportVersion, Study, Upload

CONSOLE = Path(__file__).resolve().parents[3] / "solutions" / "medical_imaging" / "console"


def _count(model: type) -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count(model.id))))


@pytest.mark.parametrize("embedded_worker", [["medical_imaging"]], indirect=True)
def test_tasks_are_idempotent_through_a_worker(embedded_worker, installed_reporter: Path, dicom_drop: Path) -> None:
    from core.queue import app

    def run(name: str, **kw: object) -> dict:
        return app.send_task(name, kwargs=kw).get(timeout=240, interval=0.05)

    first = run("medical_imaging.ingest", path=str(dicom_drop), upload_key="drop-1")
    counts = (_count(Study), _count(Instance), _count(Upload))
    second = run("medical_imaging.ingest", path=str(dicom_drop), upload_key="drop-1")
    assert first["study_uids"] == second["study_uids"] and (_count(Study), _count(Instance), _count(Upload)) == counts
    assert len(first["errors"]) == 2  # truncated + non-DICOM, reported, not raised

    with session_scope() as s:
        ct = s.scalar(select(Study).where(Study.modality == "CT")).study_uid
    d1 = run("medical_imaging.draft_report", study_uid=ct)
    d2 = run("medical_imaging.draft_report", study_uid=ct)
    assert d1["status"] == "drafted" and d1["version"] == d2["version"] and d1["findings"]
    assert _count(ReportVersion) == 1

    missing = run("medical_imaging.ingest", path="/no/such/folder", upload_key="bad-1")
    assert missing["status"] == "failed" and "no such file" in missing["error"]
    unknown = run("medical_imaging.draft_report", study_uid="2.25.1")
    assert unknown["status"] == "failed"
    # the worker survived bad input and still serves
    assert run("medical_imaging.draft_report", study_uid=ct)["version"] == d1["version"]


def _login(role: str = "radiologist") -> str:
    from core.auth import create_user, login

    create_user(f"u-{role}", "correct horse battery", role)
    return login(f"u-{role}", "correct horse battery")


def test_console_worklist_read_and_sign(tmp_home: Path) -> None:
    from streamlit.testing.v1 import AppTest

    from solutions.medical_imaging.console.common import STUDY_KEY
    from solutions.medical_imaging.workflow import ingest_path

    uid = ingest_path(dcm_file("CT_small.dcm")).study_uids[0]
    token = _login()
    at = AppTest.from_file(str(CONSOLE / "worklist.py"), default_timeout=120)
    at.session_state["verticals_token"] = token
    at.run()
    assert not at.exception
    assert uid in at.dataframe[0].value["study_uid"].tolist()

    at = AppTest.from_file(str(CONSOLE / "study.py"), default_timeout=120)
    at.session_state["verticals_token"] = token
    at.session_state[STUDY_KEY] = uid
    at.run()
    assert not at.exception
    assert len(at.get("image")) == 1  # the viewer shows the slice
    next(sb for sb in at.selectbox if sb.label == "Window preset").set_value("lung").run()
    assert at.number_input[0].value == -600.0
    at.text_area[0].input("Small nodule in the right lung.")
    at.text_area[1].input("Indeterminate nodule; follow-up CT.")
    next(b for b in at.button if b.label == "Sign report").click().run()
    assert not at.exception
    with session_scope() as s:
        assert s.scalar(select(Study).where(Study.study_uid == uid)).status == "signed"
    assert any("immutable" in m.value for m in at.success)


def test_console_refuses_wrong_role(tmp_home: Path) -> None:
    from streamlit.testing.v1 import AppTest

    token = _login("operator")
    at = AppTest.from_file(str(CONSOLE / "worklist.py"), default_timeout=60)
    at.session_state["verticals_token"] = token
    at.run()
    assert any("radiologist" in e.value for e in at.error)
