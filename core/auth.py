"""Users, roles, sessions and the audit log shared by every console.

Passwords are hashed with argon2; sessions are random tokens stored hashed (SHA-256) with an expiry.
There is no default account: the first admin is created with ``verticals users create``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, session_scope, utcnow
from core.errors import VerticalsError
from core.settings import get_settings

Role = Literal["admin", "agent", "radiologist", "operator"]
ROLES: tuple[str, ...] = ("admin", "agent", "radiologist", "operator")
_hasher = PasswordHasher()


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class UserSession(Base):
    __tablename__ = "user_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[dt.datetime] = mapped_column()


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(100), default="system")
    action: Mapped[str] = mapped_column(String(64))
    solution: Mapped[str] = mapped_column(String(64), default="core")
    target: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AuthError(VerticalsError):
    pass


def _validate_username(username: str) -> str:
    u = username.strip()
    if not (1 <= len(u) <= 100) or not all(c.isalnum() or c in "._-@" for c in u):
        raise AuthError("username must be 1-100 characters of letters, digits and . _ - @")
    return u


def create_user(username: str, password: str, role: str) -> User:
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
    if len(password) < 10:
        raise AuthError("password must have at least 10 characters")
    u = _validate_username(username)
    with session_scope() as s:
        if s.scalar(select(User).where(User.username == u)) is not None:
            raise AuthError(f"user {u!r} already exists")
        user = User(username=u, password_hash=_hasher.hash(password), role=role)
        s.add(user)
    audit("system", "user.create", target=u, detail={"role": role})
    return user


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def login(username: str, password: str) -> str:
    """Check the password and open a session. Returns the session token (keep it secret)."""
    with session_scope() as s:
        user = s.scalar(select(User).where(User.username == username.strip(), User.active.is_(True)))
        ok = False
        if user is not None:
            try:
                ok = _hasher.verify(user.password_hash, password)
            except (VerificationError, InvalidHashError):
                ok = False
        if not ok or user is None:
            audit_in(s, username[:100], "login.failed")
            raise AuthError("wrong username or password")
        token = secrets.token_urlsafe(32)
        ttl = dt.timedelta(minutes=get_settings().session_ttl_minutes)
        s.add(UserSession(token_hash=_token_hash(token), user_id=user.id, expires_at=utcnow() + ttl))
        audit_in(s, user.username, "login")
    return token


def current_user(token: str | None) -> User | None:
    """The user of a live session, or None when the token is unknown or expired."""
    if not token:
        return None
    with session_scope() as s:
        sess = s.get(UserSession, _token_hash(token))
        if sess is None:
            return None
        exp = sess.expires_at if sess.expires_at.tzinfo else sess.expires_at.replace(tzinfo=dt.UTC)
        if exp < utcnow():
            s.delete(sess)
            return None
        user = s.get(User, sess.user_id)
        return user if user is not None and user.active else None


def logout(token: str) -> None:
    with session_scope() as s:
        sess = s.get(UserSession, _token_hash(token))
        if sess is not None:
            s.delete(sess)


def require_role(user: User | None, *roles: str) -> User:
    if user is None:
        raise AuthError("please sign in")
    if user.role != "admin" and user.role not in roles:
        raise AuthError(f"this action needs the role {' or '.join(roles)} (you are {user.role})")
    return user


def audit_in(session: Any, username: str, action: str, solution: str = "core", target: str = "",
             detail: dict[str, Any] | None = None) -> None:
    session.add(AuditEvent(username=username, action=action, solution=solution, target=target,
                           detail=detail or {}))


def audit(username: str, action: str, solution: str = "core", target: str = "",
          detail: dict[str, Any] | None = None) -> None:
    with session_scope() as s:
        audit_in(s, username, action, solution, target, detail)
