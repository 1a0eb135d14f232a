"""Browser: after a real ingest + AI draft of a real CT, a radiologist edits and signs the report."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import assert_no_exception, sign_in, wait_idle
from sqlalchemy import select

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def test_radiologist_signs_the_ai_draft(browser, console, out_dir, installed_reporter: Path) -> None:
    from pydicom.data import get_testdata_file

    from core.db import session_scope
    from solutions.medical_imaging import workflow
    from solutions.medical_imaging.orm import ReportVersion, Study
    from solutions.medical_imaging.pipeline import Reporter

    res = workflow.ingest_path(get_testdata_file("CT_small.dcm"), upload_key="browser-ct")
    (uid,) = res.study_uids
    workflow.draft_study(uid, Reporter(installed_reporter))
    url, user = console("medical_imaging", "radiologist")
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    sign_in(page, url, user)
    page.get_by_role("link", name="Read study").click()
    page.get_by_text("AI draft").first.wait_for(timeout=120_000)
    wait_idle(page)
    findings = page.get_by_label("Findings")
    draft_text = findings.input_value()
    assert draft_text.strip(), "the editor should start from the AI draft"
    findings.fill(draft_text + " Reviewed in browser test.")
    page.get_by_label("Impression").fill("No acute abnormality.")
    page.get_by_label("Impression").press("Tab")  # commit the text areas before clicking
    wait_idle(page)
    page.get_by_role("button", name="Sign report").click()
    page.get_by_text(f"Signed by {user}").wait_for(timeout=120_000)
    assert_no_exception(page)
    page.screenshot(path=str(out_dir / "medical-signed.png"), full_page=True)
    with session_scope() as s:
        study = s.scalar(select(Study).where(Study.study_uid == uid))
        signed = [v for v in s.scalars(select(ReportVersion)) if v.signed]
        assert study is not None and len(signed) == 1
        assert signed[0].author == user and signed[0].findings == draft_text + " Reviewed in browser test."
        assert signed[0].impression == "No acute abnormality."
