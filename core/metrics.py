"""Prometheus metrics and a health endpoint for every Celery worker.

Each worker's main process serves ``/metrics`` (Prometheus text format, aggregated over its prefork
children through prometheus_client's multiprocess mode) and ``/healthz`` on
``VERTICALS_METRICS_BASE_PORT + queue index`` (the next free port when several workers share a
machine). The port is stored with the worker's heartbeat, so ``verticals status`` lists it.

Metrics: ``verticals_tasks_total{task,state}``, ``verticals_task_seconds{task}`` (histogram),
``verticals_tasks_in_progress{task}``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_started: dict[str, Any] = {}
_t0: dict[str, float] = {}


def prepare_multiprocess_dir(home: Path, worker_name: str) -> Path:
    """Switch prometheus_client to multiprocess mode before the pool forks (children inherit it)."""
    d = home / "metrics" / f"{worker_name.replace('@', '_')}-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    # Celery has usually imported prometheus_client already, which fixed its value class to the
    # single-process kind: pick the multiprocess one now (metrics look it up when created).
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    return d


def _metrics() -> dict[str, Any]:
    if "metrics" not in _started:
        from prometheus_client import Counter, Gauge, Histogram

        _started["metrics"] = {
            "total": Counter("verticals_tasks_total", "Tasks finished, by state", ["task", "state"]),
            "seconds": Histogram("verticals_task_seconds", "Task run time in seconds", ["task"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)),
            "running": Gauge("verticals_tasks_in_progress", "Tasks running now", ["task"],
                             multiprocess_mode="livesum"),
        }
    return _started["metrics"]


def on_task_prerun(task_id: str, task_name: str) -> None:
    _t0[task_id] = time.perf_counter()
    _metrics()["running"].labels(task_name).inc()


def on_task_postrun(task_id: str, task_name: str, state: str | None) -> None:
    m = _metrics()
    m["running"].labels(task_name).dec()
    t0 = _t0.pop(task_id, None)
    if t0 is not None:
        m["seconds"].labels(task_name).observe(time.perf_counter() - t0)
    m["total"].labels(task_name, (state or "UNKNOWN").lower()).inc()


def on_task_retry(task_name: str) -> None:
    _metrics()["total"].labels(task_name, "retry").inc()


def render_metrics() -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # pragma: no cover - single-process use
        from prometheus_client import REGISTRY as registry  # type: ignore[no-redef]
    return generate_latest(registry)


def _handler(worker_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/metrics"):
                body, ctype, code = render_metrics(), "text/plain; version=0.0.4", 200
            elif self.path.startswith("/healthz"):
                from core.db import check_database

                try:
                    check_database()
                    ok, err = True, None
                except Exception as e:
                    ok, err = False, str(e)
                body = json.dumps({"ok": ok, "worker": worker_name, "db_error": err}).encode()
                ctype, code = "application/json", 200 if ok else 503
            else:
                body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    return Handler


def serve(worker_name: str, host: str, base_port: int, tries: int = 20) -> int | None:
    """Start the metrics/health server on the first free port from ``base_port``; returns it."""
    for port in range(base_port, base_port + tries):
        try:
            server = ThreadingHTTPServer((host, port), _handler(worker_name))
        except OSError:
            continue
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="verticals-metrics", daemon=True).start()
        _started["server"] = server
        return port
    return None


def port_for(queues: list[str], base: int) -> int:
    from core.queue import ALL_QUEUES

    idx = min((ALL_QUEUES.index(q) for q in queues if q in ALL_QUEUES), default=0)
    return base + idx * 20


def local_host() -> str:
    return "127.0.0.1" if socket.gethostname() else "0.0.0.0"
