"""Browser: after a real training + inspection run on real tiles, an operator confirms a decision."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import assert_no_exception, sign_in, wait_idle
from sqlalchemy import select

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def test_operator_confirms_a_decision(browser, console, out_dir, tmp_home: Path, tiny_mvtec: Path,
                                      tiny_config) -> None:  # noqa: ANN001
    from core.db import session_scope
    from solutions.industrial_qa.evaluation import train_line
    from solutions.industrial_qa.orm import Inspection, Review
    from solutions.industrial_qa.service import record_model_version, register_image, run_inspections

    version, folder, _ = train_line(tiny_mvtec, "line-b", tiny_config)
    record_model_version("line-b", version, folder)
    images = sorted((tiny_mvtec / "test").rglob("*.jpg"))[:4]
    ids = [register_image(p, "line-b") for p in images]
    assert set(run_inspections(ids).values()) == {"done"}

    url, user = console("industrial_qa", "operator")
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    sign_in(page, url, user)
    page.get_by_role("link", name="Review queue").click()
    page.get_by_text("awaiting review").wait_for(timeout=120_000)
    wait_idle(page)
    assert_no_exception(page)
    page.screenshot(path=str(out_dir / "industrial-review-queue.png"), full_page=True)
    page.get_by_role("button", name="Confirm").first.click()
    page.get_by_text("3 part(s) awaiting review; 1 reviewed.").wait_for(timeout=120_000)
    assert_no_exception(page)
    with session_scope() as s:
        (review,) = list(s.scalars(select(Review)))
        insp = s.get(Inspection, review.inspection_id)
        assert review.reviewer == user and review.verdict == "confirm"
        assert review.label == ("defect" if insp.decision == "reject" else "good")
