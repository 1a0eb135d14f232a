"""Browser: a real SGD dialogue is tracked by the real pipeline; an agent accepts the suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import assert_no_exception, sign_in, wait_idle
from conftest import SHARED
from sqlalchemy import select

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def test_agent_accepts_a_suggestion(browser, console, out_dir, tiny_home: Path) -> None:
    from core.db import session_scope
    from solutions.customer_service import store
    from solutions.customer_service.data import load_sgd
    from solutions.customer_service.orm import Feedback, Suggestion
    from solutions.customer_service.tasks import track_turn

    dev = load_sgd(SHARED, "dev")
    service = "Restaurants_2"  # a service the tiny tracker never saw: zero-shot via its schema
    dialogue = next(d for d in dev.dialogues if d["services"] == [service])
    turns = [("customer" if t["speaker"] == "USER" else "agent", t["utterance"]) for t in dialogue["turns"][:3]]
    cid = store.import_transcript(dialogue["dialogue_id"], turns, services=[service])
    for t in store.conversation_turns(cid):
        if t.role == "customer":
            assert track_turn(cid, t.id)["status"] == "ok"

    url, user = console("customer_service", "agent")
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    sign_in(page, url, user)
    page.get_by_role("button", name="Accept").wait_for(timeout=180_000)
    wait_idle(page)
    assert_no_exception(page)
    page.screenshot(path=str(out_dir / "customer-service-suggestion.png"), full_page=True)
    page.get_by_role("button", name="Accept").click()
    page.get_by_text("feedback recorded: accepted").wait_for(timeout=120_000)
    with session_scope() as s:
        (fb,) = list(s.scalars(select(Feedback)))
        sug = s.get(Suggestion, fb.suggestion_id)
        assert fb.verdict == "accepted" and fb.final_text == sug.reply and sug.reply.strip()
    assert store.kpis()["acceptance"] == 1.0
