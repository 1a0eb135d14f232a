"""Fault injection: `verticals chaos --json` and tests/integration/test_faults.py.

Scenarios, each against real worker processes and real services:

- ``worker_kill``: kill -9 a worker in the middle of a task. On Redis/RabbitMQ the whole worker is
  killed and its unacked message is redelivered after the visibility timeout to a replacement
  worker; on the embedded filesystem broker (which cannot redeliver a message whose consumer vanished)
  the pool child is killed and the message is requeued by ``task_reject_on_worker_lost``.
- ``redis_restart``: restart Redis while jobs are being submitted and executed.
- ``postgres_restart``: restart PostgreSQL while tasks write; tasks retry with backoff.
- ``burst``: 1,000 jobs over 2 workers; throughput and worker memory before/after.

``--managed`` runs private Redis (append-only file, fsync always) and PostgreSQL instances in a
temporary folder so restarts harm nothing else; otherwise the configured services are used and the
restart scenarios need ``--redis-restart-cmd`` / ``--pg-restart-cmd``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import ServiceUnavailable

SCENARIOS = ("worker_kill", "redis_restart", "postgres_restart", "burst")


def _log(msg: str) -> None:
    print(f"[chaos] {msg}", file=sys.stderr, flush=True)


def _wait(pred: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


# ---------------------------------------------------------------- private services (--managed)
@dataclass
class PrivateRedis:
    root: Path
    port: int = 6390

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(self.port),
                        "--dir", str(self.root), "--appendonly", "yes", "--appendfsync", "always",
                        "--save", "", "--logfile", str(self.root / "redis.log"),
                        "--pidfile", str(self.root / "redis.pid")], check=True)
        if not _wait(self.ping, 20):
            raise ServiceUnavailable(f"private Redis did not start on port {self.port}")

    def ping(self) -> bool:
        r = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
        return r.stdout.strip() == "PONG"

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        _wait(lambda: not self.ping(), 20)

    def restart(self, down_s: float = 2.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


@dataclass
class PrivatePostgres:
    root: Path
    port: int = 5440
    _as: list[str] = field(default_factory=list)

    def _bin(self, name: str) -> str:
        found = shutil.which(name)
        if found:
            return found
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: float(p.parent.name))
        if not versions:
            raise ServiceUnavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
        return str(versions[-1] / name)

    def start(self) -> None:
        data = self.root / "data"
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            self._as = ["runuser", "-u", "postgres", "--"]
        if not data.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if self._as:
                shutil.chown(self.root, "postgres")
            r = subprocess.run([*self._as, self._bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise ServiceUnavailable(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        self._ctl("start")

    def _ctl(self, action: str) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        subprocess.run([*self._as, self._bin("pg_ctl"), "-D", str(self.root / "data"), "-o", opts, "-l",
                        str(self.root / "pg.log"), "-w", "-t", "60", action, *(["-m", "fast"] if action != "start" else [])],
                       check=True, capture_output=True)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop")

    def restart(self, down_s: float = 2.0) -> None:
        self._ctl("stop")
        time.sleep(down_s)
        self._ctl("start")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@contextlib.contextmanager
def private_services(root: Path) -> Iterator[tuple[PrivateRedis, PrivatePostgres, dict[str, str]]]:
    """Private Redis (append-only, fsync always) + PostgreSQL for one run, stopped and removed after.

    Yields the two servers and the ``VERTICALS_*`` variables that point settings at them.
    """
    # PostgreSQL runs as the postgres user when we are root: its folder must be reachable by that
    # user, which a caller's private temp folder (pytest's are 0700) may not be.
    pg_root = Path(tempfile.mkdtemp(prefix="verticals-pg-"))
    pg_root.chmod(0o755)
    redis_srv, pg_srv = PrivateRedis(root / "redis"), PrivatePostgres(pg_root / "pg")
    try:
        redis_srv.start()
        pg_srv.start()
        yield redis_srv, pg_srv, {"VERTICALS_DATABASE_URL": pg_srv.url, "VERTICALS_BROKER_URL": f"{redis_srv.url}/0",
                                  "VERTICALS_RESULT_BACKEND": f"{redis_srv.url}/1"}
    finally:
        pg_srv.stop()
        shutil.rmtree(pg_root, ignore_errors=True)
        redis_srv.stop()


# ---------------------------------------------------------------- the harness
@dataclass
class Harness:
    env: dict[str, str]
    log_dir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str, concurrency: int = 1, queues: tuple[str, ...] = ("platform",)) -> subprocess.Popen[bytes]:
        from core.supervisor import worker_command

        cmd = worker_command(list(queues), name, concurrency, "INFO")
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(p)
        return p

    def wait_workers(self, names: list[str], timeout: float = 90) -> None:
        from core.workers import alive_workers

        def ok() -> bool:
            alive = {w.name.split("@")[0] for w in alive_workers()}
            return set(names) <= alive

        if not _wait(ok, timeout, 0.5):
            raise ServiceUnavailable(f"workers {names} did not come up; logs in {self.log_dir}")

    def stop_all(self) -> None:
        for p in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.workers.clear()


def _submit(run_id: str, n: int, work_s: float, start: int = 0) -> None:
    from core.queue import app

    for i in range(start, start + n):
        app.send_task("platform.chaos_job", kwargs={"run_id": run_id, "key": f"k{i:05d}", "work_s": work_s})


def _attempts(run_id: str) -> int:
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.reliability import ChaosAttempt

    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(ChaosAttempt).where(ChaosAttempt.run_id == run_id)) or 0)


def _busy_worker_pid(run_id: str) -> int | None:
    """pid of a process currently executing a chaos job (latest attempt without a result)."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.reliability import ChaosAttempt, ChaosResult

    with session_scope() as s:
        done = set(s.scalars(select(ChaosResult.key).where(ChaosResult.run_id == run_id)))
        for a in s.scalars(select(ChaosAttempt).where(ChaosAttempt.run_id == run_id).order_by(ChaosAttempt.id.desc())):
            if a.key not in done:
                return a.pid
    return None


def _rss_kib(p: subprocess.Popen[bytes]) -> int:
    """Resident memory of a worker and its pool children."""
    total = 0
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(p.pid), "-p", str(p.pid)], capture_output=True, text=True)
    for line in out.stdout.split():
        total += int(line)
    return total


def _finish(run_id: str, n: int, timeout: float) -> dict[str, Any]:
    from core.reliability import count

    _wait(lambda: count(run_id, n)["completed"] >= n, timeout, 0.5)
    time.sleep(1.0)  # let any straggling redelivery land before counting duplicates
    return count(run_id, n)


def scenario_worker_kill(h: Harness, embedded: bool, n: int = 12, work_s: float = 1.0) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    h.start_worker("chaos-a")
    h.start_worker("chaos-b")
    h.wait_workers(["chaos-a", "chaos-b"])
    _submit(run_id, n, work_s)
    _wait(lambda: _attempts(run_id) >= 2, 60)
    victim = _busy_worker_pid(run_id)
    mode = "pool child" if embedded else "whole worker"
    if victim is not None:
        if embedded:
            os.kill(victim, signal.SIGKILL)
        else:
            for p in h.workers:
                kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout.split()
                if victim == p.pid or str(victim) in kids:
                    os.killpg(p.pid, signal.SIGKILL)
                    h.start_worker("chaos-c")  # the replacement a process supervisor would start
                    break
    _log(f"worker_kill: killed {mode} running a task (pid {victim})")
    out = _finish(run_id, n, timeout=180)
    h.stop_all()
    return {**out, "killed": mode}


def scenario_redis_restart(h: Harness, restart: Callable[[], None], n: int = 150) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    h.start_worker("chaos-a")
    h.start_worker("chaos-b")
    h.wait_workers(["chaos-a", "chaos-b"])
    _submit(run_id, n // 3, 0.02, 0)
    restart()
    _log("redis_restart: Redis restarted")
    _submit(run_id, n - n // 3, 0.02, n // 3)
    out = _finish(run_id, n, timeout=180)
    h.stop_all()
    return out


def scenario_postgres_restart(h: Harness, restart: Callable[[], None], n: int = 60) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    h.start_worker("chaos-a")
    h.start_worker("chaos-b")
    h.wait_workers(["chaos-a", "chaos-b"])
    _submit(run_id, n, 0.1)
    _wait(lambda: _attempts(run_id) >= 4, 60)
    restart()
    _log("postgres_restart: PostgreSQL restarted")
    from core.db import reset_engines

    reset_engines()
    out = _finish(run_id, n, timeout=240)
    h.stop_all()
    return out


def scenario_burst(h: Harness, n: int = 1000) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    a, b = h.start_worker("chaos-a"), h.start_worker("chaos-b")
    h.wait_workers(["chaos-a", "chaos-b"])
    warm = uuid.uuid4().hex[:12]
    _submit(warm, 20, 0.0)
    _finish(warm, 20, timeout=120)  # pool children forked and warmed up before measuring memory
    h_rss0 = _rss_kib(a) + _rss_kib(b)
    t0 = time.monotonic()
    _submit(run_id, n, 0.0)
    out = _finish(run_id, n, timeout=600)
    elapsed = time.monotonic() - t0
    rss1 = _rss_kib(a) + _rss_kib(b)
    h.stop_all()
    return {**out, "seconds": round(elapsed, 1), "jobs_per_s": round(out["completed"] / elapsed, 1),
            "worker_rss_mib_before": round(h_rss0 / 1024, 1), "worker_rss_mib_after": round(rss1 / 1024, 1)}


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Point this process (settings, engines, Celery client) at ``env``."""
    from core.db import reset_engines
    from core.queue import app, configure
    from core.settings import reset_settings

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_settings()
    reset_engines()
    configure(app)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings()
        reset_engines()
        configure(app)


def run_chaos(scenarios: list[str], managed: bool = True, redis_restart_cmd: str | None = None,
              pg_restart_cmd: str | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """Run the scenarios and return ``{scenario: {submitted, completed, duplicated, lost, ...}}``."""
    from core.settings import get_settings
    from infra.migrate import upgrade

    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    root = Path(workdir or tempfile.mkdtemp(prefix="verticals-chaos-"))
    root.chmod(0o755)  # the private PostgreSQL runs as the postgres user and must traverse it
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        redis_srv = pg_srv = None
        if managed:
            redis_srv, pg_srv, env = stack.enter_context(private_services(root))
        else:
            s = get_settings()
            env = {"VERTICALS_DATABASE_URL": s.effective_database_url, "VERTICALS_BROKER_URL": s.effective_broker_url,
                   "VERTICALS_RESULT_BACKEND": s.effective_result_backend}
        env |= {"VERTICALS_HOME": str(root / "home"), "VERTICALS_VISIBILITY_TIMEOUT": "10",
                "PYTHONUNBUFFERED": "1"}
        with _environment(env):
            upgrade("heads")
            embedded = get_settings().embedded_broker
            h = Harness(env=dict(os.environ), log_dir=root)
            redis_restart = redis_srv.restart if redis_srv else (
                (lambda: subprocess.run(redis_restart_cmd, shell=True, check=True)) if redis_restart_cmd else None)  # noqa: S602 - operator-given
            pg_restart = pg_srv.restart if pg_srv else (
                (lambda: subprocess.run(pg_restart_cmd, shell=True, check=True)) if pg_restart_cmd else None)  # noqa: S602
            for name in scenarios:
                _log(f"scenario {name} ...")
                t0 = time.monotonic()
                try:
                    if name == "worker_kill":
                        results[name] = scenario_worker_kill(h, embedded)
                    elif name == "redis_restart":
                        if embedded or redis_restart is None:
                            results[name] = {"skipped": "needs a Redis broker and --managed or --redis-restart-cmd"}
                            continue
                        results[name] = scenario_redis_restart(h, redis_restart)
                    elif name == "postgres_restart":
                        if pg_restart is None:
                            results[name] = {"skipped": "needs --managed or --pg-restart-cmd"}
                            continue
                        results[name] = scenario_postgres_restart(h, pg_restart)
                    elif name == "burst":
                        results[name] = scenario_burst(h)
                finally:
                    h.stop_all()
                results[name]["wall_s"] = round(time.monotonic() - t0, 1)
                _log(f"{name}: {json.dumps(results[name])}")
    return results


def register(app: typer.Typer) -> None:
    @app.command("chaos")
    def chaos(
        scenario: Annotated[list[str] | None, typer.Option("--scenario", "-s", help=f"Repeatable; default all: {', '.join(SCENARIOS)}")] = None,
        managed: Annotated[bool, typer.Option(help="Run private Redis + PostgreSQL that can be restarted safely.")] = True,
        redis_restart_cmd: Annotated[str | None, typer.Option(help="Shell command that restarts your Redis (unmanaged).")] = None,
        pg_restart_cmd: Annotated[str | None, typer.Option(help="Shell command that restarts your PostgreSQL (unmanaged).")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Fault tests against real workers: kill -9, Redis and PostgreSQL restarts, a 1,000-job burst."""
        res = run_chaos(list(scenario or SCENARIOS), managed, redis_restart_cmd, pg_restart_cmd)
        if as_json:
            print(json.dumps(res))
        else:
            for name, r in res.items():
                typer.echo(f"{name:<18} " + "  ".join(f"{k}={v}" for k, v in r.items()))
