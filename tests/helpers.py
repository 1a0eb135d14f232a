"""Test helpers shared by every suite: real Celery worker processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_worker(queues: list[str], env: dict[str, str], name: str = "test", concurrency: int = 1,
                 log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a real `celery worker` process consuming ``queues`` with the given environment."""
    from core.supervisor import worker_command

    cmd = worker_command(queues, name, concurrency, "INFO")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_worker(p: subprocess.Popen[bytes], sig: int | None = None) -> None:
    import signal

    if p.poll() is None:
        try:
            os.killpg(p.pid, sig or signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def wait_for_worker(name_prefix: str, timeout: float = 60.0) -> None:
    from core.workers import alive_workers

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.name.startswith(name_prefix) for w in alive_workers()):
            return
        time.sleep(0.25)
    raise TimeoutError(f"worker {name_prefix} did not report a heartbeat within {timeout}s")
