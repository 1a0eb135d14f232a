"""Shared fixtures: an isolated VERTICALS_HOME per test, the real shared data, and a real Celery
worker process on the embedded broker (or Redis/PostgreSQL in the integration suite)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

# Keep tests small and deterministic on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _reset() -> None:
    from core.db import reset_engines
    from core.settings import reset_settings

    reset_settings()
    reset_engines()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (it sits beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh VERTICALS_HOME with embedded defaults (SQLite + filesystem broker), schema created."""
    home = tmp_path / "home"
    monkeypatch.setenv("VERTICALS_HOME", str(home))
    for var in ("VERTICALS_DATABASE_URL", "VERTICALS_BROKER_URL", "VERTICALS_RESULT_BACKEND", "VERTICALS_MODE"):
        monkeypatch.delenv(var, raising=False)
    _reset()
    from infra.migrate import upgrade

    upgrade("heads")
    from core.queue import app, configure

    configure(app)
    yield home
    _reset()


from helpers import start_worker, stop_worker, wait_for_worker  # noqa: E402


@pytest.fixture
def embedded_worker(tmp_home: Path, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process on the embedded broker, consuming the queues given by
    ``@pytest.mark.parametrize('embedded_worker', [['industrial_qa']], indirect=True)`` (default:
    platform). Yields the process; the client side is ``core.queue.app`` (rebuilt for tmp_home)."""
    queues = getattr(request, "param", None) or ["platform"]
    env = dict(os.environ)
    log = tmp_home / "worker.log"
    p = start_worker(queues, env, name="test-" + "-".join(queues), log_path=log)
    from core.queue import app, configure

    configure(app)
    try:
        wait_for_worker("test-")
        yield p
    finally:
        stop_worker(p)
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            sys.stderr.write(log.read_text(errors="replace")[-5000:])


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# ------------------------------------------------------------------ browser tests (marker: browser)
# Debian's chromium at /usr/bin/chromium driven by Playwright (no browser download). Screenshots go
# to tests/browser/out/ (or $VERTICALS_BROWSER_OUT).
CHROMIUM = os.environ.get("VERTICALS_CHROMIUM", "/usr/bin/chromium")
BROWSER_OUT = Path(os.environ.get("VERTICALS_BROWSER_OUT", REPO / "tests" / "browser" / "out"))


@pytest.fixture(scope="session")
def browser():  # type: ignore[no-untyped-def]
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
            "--no-first-run", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def out_dir(request: pytest.FixtureRequest) -> Path:
    d = BROWSER_OUT / request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_console(solution: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    from core.registry import load_manifest
    from core.supervisor import console_command

    m = load_manifest(solution)
    if m is None or not m.console_entry.exists():
        pytest.skip(f"{solution} has no console in this checkout")
    p = subprocess.Popen(console_command(m, "127.0.0.1", port), env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    from core.supervisor import port_open

    deadline = time.monotonic() + 90
    while not port_open("127.0.0.1", port):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{solution} console did not start on port {port}")
        time.sleep(0.3)
    return p


@pytest.fixture
def console(tmp_home: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: ``console(solution, role)`` -> (url, username); processes stopped afterwards."""
    import signal

    from browser_helpers import PASSWORD

    from core.auth import create_user

    procs: list[subprocess.Popen[bytes]] = []
    port = [18701]

    def make(solution: str, role: str) -> tuple[str, str]:
        username = f"{role}-{solution}"[:40]
        create_user(username, PASSWORD, role)
        p = start_console(solution, port[0], dict(os.environ, PYTHONUNBUFFERED="1"))
        procs.append(p)
        url = f"http://127.0.0.1:{port[0]}"
        port[0] += 1
        return url, username

    yield make
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=15)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)
