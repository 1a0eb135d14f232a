"""Celery app factory: one queue per solution, plus ``platform`` and ``training``.

Embedded default (no server): the kombu filesystem broker under ``VERTICALS_HOME/broker`` and a SQLite
result backend. At scale: ``VERTICALS_BROKER_URL=redis://...`` (or ``amqp://...``) with workers on as
many machines as needed; nothing else changes.

Routing (by task name):
  ``platform.*``          -> ``platform``  (health checks, housekeeping)
  ``core.train*``         -> ``training``  (the shared core LM, trained once for every solution)
  ``<solution>.train*``   -> ``training``  (long model training, one background worker)
  ``<solution>.*``        -> ``<solution>`` (serving work: inspect, process_turn, draft_report, ...)

Delivery: late acks + reject on worker loss + prefetch 1, so a task whose worker dies is redelivered;
tasks must therefore be idempotent (take ids, upsert by a unique key). Only JSON is accepted.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Any

from celery import Celery, Task, signals

from core.settings import SOLUTION_NAMES, Settings, get_settings

log = logging.getLogger(__name__)

PLATFORM_QUEUE = "platform"
TRAINING_QUEUE = "training"
ALL_QUEUES: tuple[str, ...] = (PLATFORM_QUEUE, TRAINING_QUEUE, *SOLUTION_NAMES)


def queue_for(task_name: str) -> str:
    """The queue a task name is routed to (see module docstring)."""
    prefix, _, rest = task_name.partition(".")
    if prefix == "platform":
        return PLATFORM_QUEUE
    if prefix == "core":
        return TRAINING_QUEUE if rest.startswith("train") else PLATFORM_QUEUE
    if prefix in SOLUTION_NAMES:
        return TRAINING_QUEUE if rest.startswith("train") else prefix
    return PLATFORM_QUEUE


def _route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str]:
    return {"queue": queue_for(name)}


def present_solutions() -> list[str]:
    """Solutions whose package exists in this checkout (not-yet-built ones are simply absent)."""
    return [n for n in SOLUTION_NAMES if importlib.util.find_spec(f"solutions.{n}") is not None]


def task_modules() -> list[str]:
    mods = ["core.tasks"]
    for n in present_solutions():
        if importlib.util.find_spec(f"solutions.{n}.tasks") is not None:
            mods.append(f"solutions.{n}.tasks")
    return mods


class VerticalsTask(Task):
    """Base task: retries transient infrastructure errors with backoff; never retries bad input."""

    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff = True
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 8

    def __init__(self) -> None:
        from sqlalchemy.exc import DBAPIError, OperationalError

        transient: list[type[BaseException]] = [OperationalError, DBAPIError, ConnectionError, TimeoutError]
        try:
            from redis.exceptions import ConnectionError as RedisConnectionError

            transient.append(RedisConnectionError)
        except ImportError:  # pragma: no cover
            pass
        self.autoretry_for = tuple(transient)


def make_celery(settings: Settings | None = None) -> Celery:
    app = Celery("verticals", task_cls=VerticalsTask, include=task_modules())
    configure(app, settings)
    return app


def configure(app: Celery, settings: Settings | None = None) -> Celery:
    """(Re)apply settings to ``app`` and drop cached connections/backends (tests switch homes)."""
    import threading

    s = settings or get_settings()
    transport_options: dict[str, Any] = {
        "visibility_timeout": s.visibility_timeout,
        # Redis: how soon unacked messages of a dead worker are looked at again (~interval*throttle s).
        "unacked_restore_interval": min(10, s.visibility_timeout),
        "unacked_restore_throttle": 1 if s.visibility_timeout < 300 else 10,
    }
    if s.embedded_broker:
        folder = s.broker_dir / "queue"
        processed = s.broker_dir / "processed"
        folder.mkdir(parents=True, exist_ok=True)
        processed.mkdir(parents=True, exist_ok=True)
        transport_options |= {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(processed),
            "store_processed": False,
            "control_folder": str(s.broker_dir / "control"),
            # kombu's virtual transports poll once a second by default: ~1 job/s per worker here.
            "polling_interval": 0.05,
        }
    broker_url = s.effective_broker_url
    if s.embedded_broker:
        from core.broker_fs import ALIAS

        broker_url = f"{ALIAS}://localhost/"  # the host part is unused; naming one silences kombu
    app.conf.update(
        broker_url=broker_url,
        result_backend=s.effective_result_backend,
        broker_transport_options=transport_options,
        result_backend_transport_options={"visibility_timeout": s.visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_routes=(_route,),
        task_default_queue=PLATFORM_QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=s.task_soft_time_limit,
        task_time_limit=s.task_time_limit,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=4_000_000,  # KiB: recycle a child that grows past ~4 GB
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
    )
    pool = getattr(app, "_pool", None)
    if pool is not None:
        try:
            pool.force_close_all()
        except Exception:
            pass
        app._pool = None
    app.amqp._producer_pool = None
    app._local = threading.local()  # forgets the cached result backend
    return app


# The process-wide app used by `celery -A core.queue:app worker` and by clients.
app = make_celery()


_worker_state: dict[str, Any] = {}


def _consumed_queues(sender: Any) -> list[str]:
    try:
        return sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    except Exception:
        return []


def worker_threads(queues: list[str], configured: int = 0) -> int:
    """Math threads per task slot: the setting if > 0, else all cores for training and 1 elsewhere.

    Serving workers run one item per slot; extra threads only wait on cores that other slots and
    processes hold (measured: single-image inspection p95 28.6 ms with 1 thread vs 248-448 ms with 2
    on the busy 2-core VM). Training runs alone on its queue and uses every core.
    """
    if configured > 0:
        return configured
    return max(1, os.cpu_count() or 1) if "training" in queues else 1


def _apply_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # read by torch/numpy when a pool child first imports them
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """Each pool child: the parent's thread choice (a fork may not carry torch's pool size)."""
    if "threads" in _worker_state:
        _apply_threads(_worker_state["threads"])


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main worker process, before the pool forks: threads per slot, metrics in multiprocess mode +
    /metrics server."""
    from core import metrics

    s = get_settings()
    _worker_state["threads"] = worker_threads(_consumed_queues(sender), s.worker_threads)
    _apply_threads(_worker_state["threads"])
    name = getattr(sender, "hostname", None) or "worker"
    metrics.prepare_multiprocess_dir(s.home, name)
    port = metrics.serve(name, "127.0.0.1" if s.console_host == "127.0.0.1" else "0.0.0.0",
                         metrics.port_for(_consumed_queues(sender), s.metrics_base_port))
    _worker_state["metrics_port"] = port


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    from core.workers import start_heartbeat

    queues = ",".join(_consumed_queues(sender))
    name = getattr(sender, "hostname", "worker")
    port = _worker_state.get("metrics_port")
    sender._verticals_hb = start_heartbeat(name, queues, port)  # type: ignore[union-attr]


@signals.task_prerun.connect
def _on_task_prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    from core import metrics

    metrics.on_task_prerun(task_id, getattr(task, "name", "?"))


@signals.task_postrun.connect
def _on_task_postrun(task_id: str = "", task: Any = None, state: str | None = None, **_: Any) -> None:
    from core import metrics

    metrics.on_task_postrun(task_id, getattr(task, "name", "?"), state)


@signals.task_retry.connect
def _on_task_retry(sender: Any = None, **_: Any) -> None:
    from core import metrics

    metrics.on_task_retry(getattr(sender, "name", "?"))


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    from core.workers import mark_stopped

    stop = getattr(sender, "_verticals_hb", None)
    if stop is not None:
        stop.set()
    try:
        mark_stopped(getattr(sender, "hostname", "worker"))
    except Exception:
        pass
