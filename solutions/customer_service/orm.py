"""Tables of the customer-service solution (schema via ``infra/migrations/versions/customer_service_0001_initial.py``).

conversations 1-n turns; each customer turn has at most one state row (tracker output + focus graph)
and one suggestion row (next action + reply); agents leave feedback rows on suggestions. Turn and
suggestion text is stored PII-masked. KB entries feed reply retrieval.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, utcnow


class Conversation(Base):
    __tablename__ = "cs_conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    channel: Mapped[str] = mapped_column(String(32), default="chat")
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | resolved | escalated
    services: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Turn(Base):
    __tablename__ = "cs_turns"
    __table_args__ = (UniqueConstraint("conversation_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("cs_conversations.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # customer | agent
    text: Mapped[str] = mapped_column(Text)  # PII-masked
    n_bytes: Mapped[int] = mapped_column(Integer, default=0)
    input_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TurnState(Base):
    __tablename__ = "cs_states"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("cs_turns.id", ondelete="CASCADE"), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="ok")  # ok | failed
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    focus: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flagged_injection: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Suggestion(Base):
    __tablename__ = "cs_suggestions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("cs_turns.id", ondelete="CASCADE"), unique=True, index=True)
    next_action: Mapped[str] = mapped_column(String(100), default="")
    reply: Mapped[str] = mapped_column(Text, default="")
    snippets: Mapped[list[Any]] = mapped_column(JSON, default=list)
    ungrounded: Mapped[list[Any]] = mapped_column(JSON, default=list)
    model: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Feedback(Base):
    __tablename__ = "cs_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    suggestion_id: Mapped[int] = mapped_column(ForeignKey("cs_suggestions.id", ondelete="CASCADE"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))  # accepted | edited | rejected
    final_text: Mapped[str] = mapped_column(Text, default="")
    agent: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class KBArticle(Base):
    __tablename__ = "cs_kb_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    title: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(64), default="faq")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
