"""Playwright helpers for the console browser tests."""

from __future__ import annotations

import time

PASSWORD = "correct-horse-battery"


def sign_in(page, url: str, username: str, password: str = PASSWORD) -> None:  # type: ignore[no-untyped-def]
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Username", exact=True).fill(username)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {username}").wait_for(timeout=60_000)


def assert_no_exception(page) -> None:  # type: ignore[no-untyped-def]
    errs = page.locator('[data-testid="stException"]')
    assert errs.count() == 0, errs.first.inner_text()[:2000]


def wait_idle(page, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until Streamlit has finished running the script (no 'Running...' status widget)."""
    deadline = time.monotonic() + timeout
    time.sleep(0.5)
    while time.monotonic() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count() == 0:
            return
        time.sleep(0.3)
