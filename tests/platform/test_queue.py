"""A real Celery worker process on the embedded broker runs a real platform task."""

from __future__ import annotations

import pytest

from core.queue import PLATFORM_QUEUE, TRAINING_QUEUE, app, queue_for


def test_routing_by_task_name() -> None:
    assert queue_for("platform.health") == PLATFORM_QUEUE
    assert queue_for("industrial_qa.inspect") == "industrial_qa"
    assert queue_for("industrial_qa.train_default") == TRAINING_QUEUE
    assert queue_for("medical_imaging.draft_report") == "medical_imaging"
    assert queue_for("core.train_default_lm") == TRAINING_QUEUE


def test_delivery_guarantees_are_configured() -> None:
    c = app.conf
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    assert c.accept_content == ["json"] and c.task_serializer == "json"


@pytest.mark.parametrize("embedded_worker", [["platform"]], indirect=True)
def test_health_task_round_trip_on_embedded_broker(embedded_worker) -> None:
    res = app.send_task("platform.health", kwargs={"note": "ping"})
    out = res.get(timeout=60, interval=0.05)
    assert out["ok"] is True and out["db"] == "sqlite" and out["note"] == "ping"
    assert out["pid"] != __import__("os").getpid()  # it ran in the worker process
    assert out["worker"].startswith("test-platform@")
    assert out["threads"] == 1  # serving queues: one math thread per task slot by default


def test_worker_threads_policy() -> None:
    import os

    from core.queue import worker_threads

    assert worker_threads(["industrial_qa"]) == 1
    assert worker_threads(["platform"]) == 1
    assert worker_threads(["training"]) == max(1, os.cpu_count() or 1)
    assert worker_threads(["customer_service"], configured=3) == 3
