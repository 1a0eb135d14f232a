"""Headless Chromium signs into each console and checks it renders without an exception."""

from __future__ import annotations

import pytest
from browser_helpers import assert_no_exception, sign_in, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

ROLES = {"industrial_qa": "operator", "customer_service": "agent", "medical_imaging": "radiologist"}


@pytest.mark.parametrize("solution", list(ROLES))
def test_sign_in_and_landing_page(browser, console, out_dir, solution: str) -> None:
    url, user = console(solution, ROLES[solution])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    # A wrong password is refused with a message, not a traceback.
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Username", exact=True).fill(user)
    page.get_by_role("textbox", name="Password").fill("wrong-password-123")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("wrong username or password").wait_for(timeout=60_000)
    sign_in(page, url, user)
    wait_idle(page)
    assert_no_exception(page)
    page.screenshot(path=str(out_dir / f"{solution}-landing.png"), full_page=True)
    page.close()
