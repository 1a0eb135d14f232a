"""Flower beside a Redis deployment: it starts from the same app and sees the running worker."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import start_worker, stop_worker, wait_for_worker

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flower_monitors_the_queues_on_redis(scale_env: dict[str, str], tmp_path: Path) -> None:
    from core.settings import get_settings
    from core.supervisor import flower_command

    assert not get_settings().embedded_broker
    port = _free_port()
    worker = start_worker(["platform"], scale_env, name="flowertest", log_path=tmp_path / "worker.log")
    flower = subprocess.Popen(flower_command("127.0.0.1", port, "ops:s3cret-pass"), env=scale_env, stdout=open(tmp_path / "flower.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_worker("flowertest", timeout=90)
        auth = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret-pass").decode()}
        api = f"http://127.0.0.1:{port}/api/workers?refresh=1"
        deadline, workers = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(urllib.request.Request(api, headers=auth), timeout=10) as r:
                    workers = json.loads(r.read())
                if any(name.startswith("flowertest@") for name in workers):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert any(name.startswith("flowertest@") for name in workers), (tmp_path / "flower.log").read_text()[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as e:  # the API is closed without the password
            urllib.request.urlopen(api, timeout=10)
        assert e.value.code == 401
    finally:
        stop_worker(flower)
        stop_worker(worker)
