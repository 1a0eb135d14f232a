"""`verticals status`: what is running and what is missing, from the DB, the broker and the disk."""

from __future__ import annotations

import socket
from typing import Any

from core.settings import get_settings


def _queue_depths() -> dict[str, Any]:
    from core.queue import ALL_QUEUES

    s = get_settings()
    if s.embedded_broker:
        folder = s.broker_dir / "queue"
        depth = {q: 0 for q in ALL_QUEUES}
        if folder.exists():
            for f in folder.iterdir():
                # kombu filesystem transport names files <ts>_<uuid>.<queue>.msg
                parts = f.name.split(".")
                if len(parts) >= 3 and parts[-1] == "msg" and parts[-2] in depth:
                    depth[parts[-2]] += 1
        return {"ok": True, "broker": "filesystem", "depth": depth}
    if s.effective_broker_url.startswith(("redis://", "rediss://")):
        import redis

        try:
            r = redis.Redis.from_url(s.effective_broker_url, socket_connect_timeout=3)
            return {"ok": True, "broker": "redis", "depth": {q: int(r.llen(q)) for q in ALL_QUEUES}}
        except Exception as e:
            return {"ok": False, "broker": "redis", "error": str(e).splitlines()[0]}
    return {"ok": None, "broker": s.effective_broker_url.split(":")[0], "depth": {}}


def collect_status() -> dict[str, Any]:
    from core.db import check_database
    from core.errors import VerticalsError

    s = get_settings()
    out: dict[str, Any] = {"home": str(s.home), "mode": s.mode}
    try:
        check_database()
        out["database"] = {"ok": True, "url": s.effective_database_url.split("@")[-1]}
    except VerticalsError as e:
        out["database"] = {"ok": False, "error": str(e)}
        out["broker"] = _queue_depths()
        return out
    out["broker"] = _queue_depths()

    from core.jobs import list_jobs
    from core.registry import built_solutions, model_states
    from core.workers import alive_workers

    try:
        out["workers"] = [{"name": w.name, "queues": w.queues, "pid": w.pid, "last_seen": w.last_seen,
                           "metrics": f"http://{'127.0.0.1' if w.host == socket.gethostname() else w.host}:{w.metrics_port}/metrics"
                           if w.metrics_port else None}
                          for w in alive_workers()]
        out["jobs"] = [{"key": j.key, "status": j.status, "progress": round(j.progress, 3),
                        "message": j.message, "error": j.error} for j in list_jobs(limit=20)]
    except Exception as e:  # schema not created yet
        out["workers"], out["jobs"] = [], []
        out["schema_error"] = f"{type(e).__name__}: run `verticals db upgrade`"
    out["solutions"] = {}
    for m in built_solutions():
        out["solutions"][m.name] = {
            "console_port": s.console_port(m.name),
            "models": {model.name: ready for model, ready in model_states(m, s)},
        }
    return out


def render_status(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    db = st["database"]
    c.print(f"home: {st['home']}  mode: {st['mode']}")
    c.print(f"database: {'[green]ok[/]' if db['ok'] else '[red]' + db.get('error', 'down') + '[/]'}")
    b = st.get("broker", {})
    c.print(f"broker: {b.get('broker')} {'[green]ok[/]' if b.get('ok') else '[red]' + str(b.get('error', '?')) + '[/]'}"
            + ("  queued: " + ", ".join(f"{k}={v}" for k, v in b.get("depth", {}).items()) if b.get("depth") else ""))
    if not db["ok"]:
        return
    t = Table(title="workers alive")
    for col in ("name", "queues", "pid", "metrics"):
        t.add_column(col)
    for w in st["workers"]:
        t.add_row(w["name"], w["queues"], str(w["pid"]), w["metrics"] or "-")
    c.print(t if st["workers"] else "workers alive: none (start them with `verticals up`)")
    for name, sol in st["solutions"].items():
        models = ", ".join(f"{m}: {'ready' if ok else 'missing'}" for m, ok in sol["models"].items()) or "no default models"
        c.print(f"{name}: console port {sol['console_port']}; {models}")
    if st["jobs"]:
        t = Table(title="background jobs")
        for col in ("key", "status", "progress", "message"):
            t.add_column(col)
        for j in st["jobs"]:
            t.add_row(j["key"], j["status"], f"{j['progress']:.0%}", (j["error"] or j["message"])[:80])
        c.print(t)
