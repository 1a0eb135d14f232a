"""`verticals up`: start workers and consoles as child processes, print URLs, stop them all on exit.

Each child runs in its own process group so that stopping kills its whole tree (Celery prefork
children, Streamlit). Logs go to ``VERTICALS_HOME/logs/<name>.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.queue import PLATFORM_QUEUE, TRAINING_QUEUE
from core.registry import SolutionManifest
from core.settings import Settings


def worker_command(queues: list[str], name: str, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "core.queue:app", "worker",
        "-Q", ",".join(queues), "-n", f"{name}@%h", "-c", str(concurrency),
        "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ]


def console_command(manifest: SolutionManifest, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(manifest.console_entry),
        "--server.headless", "true", "--server.address", host, "--server.port", str(port),
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",
    ]


def flower_command(host: str, port: int, basic_auth: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "core.queue:app", "flower", f"--address={host}", f"--port={port}"]
    return cmd + ([f"--basic-auth={basic_auth}"] if basic_auth else [])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


@dataclass
class Supervisor:
    settings: Settings
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        d = self.settings.home / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = p
        return p

    def start(self, manifests: list[SolutionManifest], consoles: bool = True) -> dict[str, str]:
        s = self.settings
        self.spawn("worker-platform", worker_command([PLATFORM_QUEUE], "platform"))
        self.spawn("worker-training", worker_command([TRAINING_QUEUE], "training"))
        urls: dict[str, str] = {}
        for m in manifests:
            self.spawn(f"worker-{m.name}", worker_command([m.name], m.name, s.worker_concurrency))
            if consoles and m.console_entry.exists():
                port = s.console_port(m.name)
                if port_open(s.console_host, port):
                    from core.errors import ServiceUnavailable

                    self.stop()
                    raise ServiceUnavailable(
                        f"port {port} for the {m.title} console is already in use; "
                        f"stop that process or set VERTICALS_CONSOLE_BASE_PORT"
                    )
                self.spawn(f"console-{m.name}", console_command(m, s.console_host, port))
                urls[m.title] = f"http://{s.console_host}:{port}"
        # Flower reads worker events, which the embedded filesystem broker cannot broadcast: it runs
        # beside Redis/RabbitMQ deployments only (`verticals status` shows queue depths in both cases).
        # Outside local mode it needs VERTICALS_FLOWER_BASIC_AUTH (its API can revoke tasks).
        if (consoles and not s.embedded_broker and s.flower_port and not port_open(s.console_host, s.flower_port)
                and (s.flower_basic_auth or s.mode == "local")):
            self.spawn("flower", flower_command(s.console_host, s.flower_port, s.flower_basic_auth))
            urls["Flower (queues)"] = f"http://{s.console_host}:{s.flower_port}"
        return urls

    def wait_ready(self, urls: dict[str, str], timeout: float = 120.0) -> list[str]:
        """Wait until each console port answers; returns the ones that did not come up."""
        pending = dict(urls)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for title, url in list(pending.items()):
                host, port = url.removeprefix("http://").split(":")
                if port_open(host, int(port)):
                    pending.pop(title)
            dead = self.dead()
            if dead:
                break
            time.sleep(0.5)
        return list(pending)

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whole group: prefork children too
            except ProcessLookupError:
                pass
            p.wait()
