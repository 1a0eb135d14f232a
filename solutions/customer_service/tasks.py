"""Celery tasks of the customer-service solution: thin, idempotent, ids in -> assist -> DB.

``customer_service.process_turn(conversation_id, turn_id)``: track the state after a customer turn
and store state + suggestion (upsert by turn id: a re-run updates, never duplicates). Bad input or a
missing model is recorded as a failed state row with its reason; the task does not raise for it.
``customer_service.retrack(conversation_ids)``: batch re-tracking of imported transcripts.
``customer_service.train_default(job_key, task, dataset)``: the manifest's default models.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from core.errors import VerticalsError
from core.jobs import JobReporter, progress
from core.queue import app
from core.settings import get_settings


@functools.lru_cache(maxsize=2)
def _assist(home: str) -> Any:
    from solutions.customer_service import data as D
    from solutions.customer_service.assist import AgentAssist, load_catalogue
    from solutions.customer_service.dst import DialogueStateTracker
    from solutions.customer_service.encoder import default_encoder
    from solutions.customer_service.orm import KBArticle
    from solutions.customer_service.pipeline import is_trained, load_actions, model_folder
    from solutions.customer_service.reply import KBEntry, default_chat_model

    del home
    root = get_settings().data_root / "customer_service"
    enc = default_encoder()
    tracker = DialogueStateTracker.load(model_folder("dst", "sgd"), enc)
    actions = load_actions(enc) if is_trained("actions", "star") else None
    entries = [KBEntry(f"star:{k}", k, v) for k, v in D.star_responses(root).items()]
    from sqlalchemy import select

    from core.db import session_scope

    with session_scope() as s:
        entries += [KBEntry(f"kb:{a.key}", a.title, a.text) for a in s.scalars(select(KBArticle))]
    return AgentAssist(tracker, load_catalogue(root), actions, entries, default_chat_model())


def track_turn(conversation_id: int, turn_id: int) -> dict[str, Any]:
    """In-process body of ``process_turn`` (also used by ``retrack`` and the console simulator)."""
    from solutions.customer_service import store
    from solutions.customer_service.orm import Conversation

    turns = store.conversation_turns(conversation_id)
    turn = next((t for t in turns if t.id == turn_id), None)
    if turn is None:
        return {"status": "failed", "error": f"turn {turn_id} is not in conversation {conversation_id}"}
    if turn.role != "customer":
        return {"status": "skipped", "reason": "agent turn"}
    if turn.input_error and "not valid UTF-8" in turn.input_error:
        store.upsert_state(turn_id, status="failed", error=turn.input_error)
        return {"status": "failed", "error": turn.input_error}
    prev_state, prev_focus = store.previous_state(conversation_id, turn.idx)
    history = [(t.role, t.text) for t in turns if t.idx <= turn.idx]
    from core.db import session_scope

    with session_scope() as s:
        services = list(s.get(Conversation, conversation_id).services or [])  # type: ignore[union-attr]
    try:
        res = _assist(str(get_settings().home)).process(history, prev_state, prev_focus, services or None)
    except VerticalsError as e:  # missing model, bad data: record, do not retry forever
        store.upsert_state(turn_id, status="failed", error=str(e))
        return {"status": "failed", "error": str(e)}
    store.upsert_state(turn_id, status="ok", error=turn.input_error, state=res.state, focus=res.focus,
                       flagged_injection=res.flagged_injection, latency_ms=res.latency_ms)
    sid = store.upsert_suggestion(turn_id, next_action=res.next_action, reply=res.reply, snippets=res.snippets,
                                  ungrounded=res.ungrounded, model=res.model)
    return {"status": "ok", "suggestion_id": sid, "next_action": res.next_action, "latency_ms": res.latency_ms}


@app.task(name="customer_service.process_turn")
def process_turn(conversation_id: int, turn_id: int) -> dict[str, Any]:
    return track_turn(int(conversation_id), int(turn_id))


@app.task(name="customer_service.retrack")
def retrack(conversation_ids: list[int], job_key: str | None = None) -> dict[str, Any]:
    """Re-track every customer turn of imported conversations, in order (states are upserted)."""
    from solutions.customer_service import store

    key = job_key or f"retrack:{','.join(map(str, conversation_ids))[:150]}"
    done = failed = 0
    with JobReporter(key, kind="retrack", solution="customer_service") as rep:
        for cid in progress(conversation_ids, desc="re-tracking", reporter=rep):
            for t in store.conversation_turns(int(cid)):
                if t.role == "customer":
                    r = track_turn(int(cid), t.id)
                    done += r["status"] == "ok"
                    failed += r["status"] == "failed"
    return {"tracked": done, "failed": failed}


@app.task(name="customer_service.train_default")
def train_default(job_key: str, task: str = "dst", dataset: str = "sgd", data_root: str | None = None) -> dict[str, Any]:
    from solutions.customer_service.pipeline import train

    root = Path(data_root) if data_root else get_settings().data_root / "customer_service"
    with JobReporter(job_key, kind="train", solution="customer_service") as rep:
        return train(task, dataset, root, reporter=rep)
