"""`verticals up` starts workers (and consoles of built solutions), and stops them all cleanly."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.settings import SOLUTION_NAMES
from core.supervisor import port_open

REPO = Path(__file__).resolve().parents[2]
BASE_PORT = 18601


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,stat="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp, stat = line.split(None, 2)
        if not stat.startswith("Z"):
            children.setdefault(int(pp), []).append(int(p))
    found, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            found.append(c)
            stack.append(c)
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def test_up_starts_and_stops_cleanly(tmp_home: Path) -> None:
    env = dict(os.environ, VERTICALS_HOME=str(tmp_home), VERTICALS_CONSOLE_BASE_PORT=str(BASE_PORT),
               VERTICALS_AUTO_TRAIN="false", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "up"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(x.startswith("logs:") for x in seen):
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        assert any(x.startswith("logs:") for x in seen), "".join(seen)

        from core.workers import alive_workers

        deadline = time.monotonic() + 90
        names: set[str] = set()
        while time.monotonic() < deadline:
            names = {w.name.split("@")[0] for w in alive_workers()}
            if {"platform", "training"} <= names:
                break
            time.sleep(0.5)
        assert {"platform", "training"} <= names, (names, "".join(seen))
        urls = [x for x in seen if "http://127.0.0.1:" in x]
        ports = [int(x.split("http://127.0.0.1:")[1].split()[0]) for x in urls]
        for port in ports:
            assert port_open("127.0.0.1", port), f"console on {port} not listening"
        kids = _descendants(proc.pid)
        assert len(kids) >= 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    time.sleep(0.5)
    assert _alive(kids) == [], "processes left running after Ctrl-C"
    for i in range(len(SOLUTION_NAMES)):
        assert not port_open("127.0.0.1", BASE_PORT + i)


def test_unknown_solution_is_one_line(tmp_home: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "core.cli", "up", "--solutions", "crm"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown solution(s): crm; choose from industrial-qa, customer-service, medical-imaging"]


def test_unreachable_database_is_one_line(tmp_home: Path) -> None:
    env = dict(os.environ, VERTICALS_DATABASE_URL="postgresql+psycopg://v@127.0.0.1:1/v")
    r = subprocess.run([sys.executable, "-m", "core.cli", "up"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: database unreachable at postgresql+psycopg://v@127.0.0.1:1/v")
