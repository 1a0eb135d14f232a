"""Workers expose Prometheus metrics and a health endpoint; status lists them."""

from __future__ import annotations

import json
import urllib.request

import pytest

from core.queue import app


@pytest.mark.parametrize("embedded_worker", [["platform"]], indirect=True)
def test_worker_serves_metrics_and_health(embedded_worker, tmp_home) -> None:
    for _ in range(3):
        app.send_task("platform.health").get(timeout=60, interval=0.05)
    from core.status import collect_status

    st = collect_status()
    (w,) = [w for w in st["workers"] if w["name"].startswith("test-platform")]
    assert w["metrics"], st
    text = urllib.request.urlopen(w["metrics"], timeout=10).read().decode()
    line = [x for x in text.splitlines()
            if x.startswith('verticals_tasks_total{') and 'task="platform.health"' in x and 'state="success"' in x]
    assert line and float(line[0].split()[-1]) == 3.0, text[:2000]
    assert "verticals_task_seconds_bucket" in text
    health = json.loads(urllib.request.urlopen(w["metrics"].replace("/metrics", "/healthz"), timeout=10).read())
    assert health["ok"] is True and health["worker"].startswith("test-platform")
