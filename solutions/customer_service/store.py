"""Database operations of the customer-service product (used by tasks, console and CLI).

Input rules for a message (``add_turn``):
  - bytes must be UTF-8; otherwise the turn is stored decoded with U+FFFD replacements and marked
    with ``input_error`` (nothing is lost: ``n_bytes`` keeps the original size), and tracking of that
    turn records a failed state with the reason;
  - empty / whitespace-only -> ``DataError`` (there is nothing to store);
  - longer than ``MAX_MESSAGE_BYTES`` (1 MB) -> ``DataError``; up to that it is stored in full and the
    tracker reads the last ``TRACK_CHARS`` characters (flagged in ``input_error``);
  - text is PII-masked before it is written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.db import session_scope, utcnow
from core.errors import DataError
from solutions.customer_service.orm import Conversation, Feedback, KBArticle, Suggestion, Turn, TurnState
from solutions.customer_service.pii import mask_pii

MAX_MESSAGE_BYTES = 1_000_000
TRACK_CHARS = 2_000
ROLES = ("customer", "agent")
VERDICTS = ("accepted", "edited", "rejected")


def validate_message(text: str | bytes) -> tuple[str, int, str | None]:
    """(text to store, original byte size, input error or None). Raises DataError when unusable."""
    err = None
    if isinstance(text, bytes | bytearray):
        n = len(text)
        if n > MAX_MESSAGE_BYTES:
            raise DataError(f"message of {n:,} bytes is over the {MAX_MESSAGE_BYTES:,}-byte limit")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            text = bytes(text).decode("utf-8", errors="replace")
            err = f"message is not valid UTF-8 (byte {e.start}); stored with replacement characters, not tracked"
    else:
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > MAX_MESSAGE_BYTES:
            raise DataError(f"message of {n:,} bytes is over the {MAX_MESSAGE_BYTES:,}-byte limit")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.strip():
        raise DataError("empty message: nothing to store")
    if err is None and len(text) > TRACK_CHARS:
        err = f"long message ({len(text):,} characters): stored in full, tracked on the last {TRACK_CHARS:,}"
    return text, n, err


def get_or_create_conversation(external_id: str, services: list[str] | None = None, channel: str = "chat") -> int:
    with session_scope() as s:
        conv = s.scalar(select(Conversation).where(Conversation.external_id == external_id))
        if conv is None:
            conv = Conversation(external_id=external_id, channel=channel, services=list(services or []))
            s.add(conv)
            s.flush()
        elif services:
            conv.services = sorted(set(conv.services or []) | set(services))
        return conv.id


def add_turn(conversation_id: int, role: str, text: str | bytes) -> int:
    """Append a message; returns the turn id. Idempotent per (conversation, index) by construction."""
    if role not in ROLES:
        raise DataError(f"role must be one of {ROLES}, not {role!r}")
    clean, n, err = validate_message(text)
    with session_scope() as s:
        if s.get(Conversation, conversation_id) is None:
            raise DataError(f"conversation {conversation_id} does not exist")
        last = s.scalar(select(func.max(Turn.idx)).where(Turn.conversation_id == conversation_id))
        idx = 0 if last is None else last + 1
        t = Turn(conversation_id=conversation_id, idx=idx, role=role, text=mask_pii(clean), n_bytes=n, input_error=err)
        s.add(t)
        s.flush()
        return t.id


def import_transcript(external_id: str, turns: list[tuple[str, str]], services: list[str] | None = None) -> int:
    """Create a conversation with all its turns (re-import of the same id adds nothing)."""
    cid = get_or_create_conversation(external_id, services, channel="import")
    with session_scope() as s:
        have = s.scalar(select(func.count()).select_from(Turn).where(Turn.conversation_id == cid)) or 0
    for role, text in turns[have:]:
        add_turn(cid, role, text)
    return cid


def conversation_turns(conversation_id: int) -> list[Turn]:
    with session_scope() as s:
        return list(s.scalars(select(Turn).where(Turn.conversation_id == conversation_id).order_by(Turn.idx)))


def _upsert_by_turn(model: type[TurnState] | type[Suggestion], turn_id: int, fields: dict[str, Any]) -> int:
    """One row per turn: a re-run of a task updates it, never adds a second one."""
    with session_scope() as s:
        row = s.scalar(select(model).where(model.turn_id == turn_id))
        if row is None:
            row = model(turn_id=turn_id)
            s.add(row)
        for k, v in fields.items():
            setattr(row, k, v)
        s.flush()
        return row.id


def upsert_state(turn_id: int, **fields: Any) -> None:
    _upsert_by_turn(TurnState, turn_id, fields)


def upsert_suggestion(turn_id: int, **fields: Any) -> int:
    return _upsert_by_turn(Suggestion, turn_id, fields)


def previous_state(conversation_id: int, before_idx: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, focus) of the latest successfully tracked customer turn before ``before_idx``."""
    with session_scope() as s:
        row = s.execute(
            select(TurnState.state, TurnState.focus).join(Turn, Turn.id == TurnState.turn_id)
            .where(Turn.conversation_id == conversation_id, Turn.idx < before_idx, TurnState.status == "ok")
            .order_by(Turn.idx.desc()).limit(1)).first()
    return (dict(row[0] or {}), dict(row[1] or {})) if row else ({}, {})


def record_feedback(suggestion_id: int, verdict: str, final_text: str = "", agent: str = "") -> int:
    if verdict not in VERDICTS:
        raise DataError(f"verdict must be one of {VERDICTS}")
    with session_scope() as s:
        if s.get(Suggestion, suggestion_id) is None:
            raise DataError(f"suggestion {suggestion_id} does not exist")
        fb = Feedback(suggestion_id=suggestion_id, verdict=verdict, final_text=mask_pii(final_text), agent=agent)
        s.add(fb)
        s.flush()
        return fb.id


def set_status(conversation_id: int, status: str) -> None:
    if status not in ("open", "resolved", "escalated"):
        raise DataError("status must be open, resolved or escalated")
    with session_scope() as s:
        conv = s.get(Conversation, conversation_id)
        if conv is None:
            raise DataError(f"conversation {conversation_id} does not exist")
        conv.status = status
        conv.closed_at = None if status == "open" else utcnow()


def upsert_kb(key: str, title: str, text: str, source: str = "faq") -> None:
    with session_scope() as s:
        row = s.scalar(select(KBArticle).where(KBArticle.key == key))
        if row is None:
            s.add(KBArticle(key=key, title=title, text=mask_pii(text), source=source))
        else:
            row.title, row.text, row.source = title, mask_pii(text), source


def kpis() -> dict[str, float | int | None]:
    """Suggestion acceptance, median handling time (s), share resolved without escalation."""
    with session_scope() as s:
        verdicts = [v for (v,) in s.execute(select(Feedback.verdict))]
        convs = list(s.execute(select(Conversation.status, Conversation.created_at, Conversation.closed_at)))
    closed = [c for c in convs if c[0] != "open"]
    times = sorted((c[2] - c[1]).total_seconds() for c in closed if c[2] is not None and c[1] is not None)
    return {
        "suggestions_rated": len(verdicts),
        "acceptance": round(sum(v == "accepted" for v in verdicts) / len(verdicts), 3) if verdicts else None,
        "accepted_or_edited": round(sum(v != "rejected" for v in verdicts) / len(verdicts), 3) if verdicts else None,
        "conversations": len(convs),
        "handling_time_s_median": round(times[len(times) // 2], 1) if times else None,
        "resolved_without_escalation": round(sum(c[0] == "resolved" for c in closed) / len(closed), 3) if closed else None,
    }
