"""Shared console helpers: queries for the pages (no page logic)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.db import session_scope
from solutions.customer_service.orm import Conversation, Suggestion, Turn, TurnState

SOLUTION = "customer_service"


def list_conversations(status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    with session_scope() as s:
        n_turns = select(Turn.conversation_id, func.count().label("n")).group_by(Turn.conversation_id).subquery()
        q = (select(Conversation, n_turns.c.n).outerjoin(n_turns, n_turns.c.conversation_id == Conversation.id)
             .order_by(Conversation.updated_at.desc()).limit(limit))
        if status and status != "all":
            q = q.where(Conversation.status == status)
        return [{"id": c.id, "conversation": c.external_id, "status": c.status, "channel": c.channel,
                 "turns": int(n or 0), "services": ", ".join(c.services or []), "updated": c.updated_at}
                for c, n in s.execute(q)]


def conversation_view(conversation_id: int) -> list[dict[str, Any]]:
    """Turns with their state / suggestion rows (None when not tracked yet)."""
    with session_scope() as s:
        rows = s.execute(
            select(Turn, TurnState, Suggestion).outerjoin(TurnState, TurnState.turn_id == Turn.id)
            .outerjoin(Suggestion, Suggestion.turn_id == Turn.id)
            .where(Turn.conversation_id == conversation_id).order_by(Turn.idx)).all()
        out = []
        for t, st_, sg in rows:
            out.append({
                "turn_id": t.id, "idx": t.idx, "role": t.role, "text": t.text, "input_error": t.input_error,
                "state": None if st_ is None else {"status": st_.status, "error": st_.error, "state": st_.state,
                                                   "focus": st_.focus, "flagged": st_.flagged_injection},
                "suggestion": None if sg is None else {"id": sg.id, "next_action": sg.next_action, "reply": sg.reply,
                                                       "snippets": sg.snippets, "ungrounded": sg.ungrounded},
            })
        return out
