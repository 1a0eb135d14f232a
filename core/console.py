"""Shared Streamlit pieces for every console: sign-in, model/training status, audit.

Pages call ``user = require_user("operator")`` first; the page stops at a sign-in form until a
valid session exists. The session token lives in ``st.session_state["verticals_token"]``.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from core.auth import AuthError, User, current_user, login, logout
from core.auth import audit as _audit

TOKEN_KEY = "verticals_token"


def _signed_in() -> User | None:
    try:
        return current_user(st.session_state.get(TOKEN_KEY))
    except Exception as e:  # DB down: say so instead of a traceback
        st.error(f"cannot reach the database: {e}")
        st.stop()
        return None


def require_user(*roles: str) -> User:
    """The signed-in user with one of ``roles`` (admin always passes); otherwise stop at a form."""
    user = _signed_in()
    if user is None:
        st.subheader("Sign in")
        with st.form("verticals-login"):
            username = st.text_input("Username")
            password = st.text_input("Password", type="password")
            submitted = st.form_submit_button("Sign in")
        if submitted:
            try:
                st.session_state[TOKEN_KEY] = login(username, password)
                st.rerun()
            except AuthError as e:
                st.error(str(e))
        st.caption("No account yet? An admin creates one with `verticals users create`.")
        st.stop()
    assert user is not None  # for type checkers: st.stop() above never returns
    if roles and user.role != "admin" and user.role not in roles:
        st.error(f"This page needs the role {' or '.join(roles)}; you are signed in as {user.role}.")
        st.stop()
    with st.sidebar:
        st.caption(f"Signed in as **{user.username}** ({user.role})")
        if st.button("Sign out", key="verticals-logout"):
            logout(st.session_state.pop(TOKEN_KEY))
            st.rerun()
    return user


def audit(action: str, target: str = "", detail: dict[str, Any] | None = None, solution: str = "core") -> None:
    """Record an action by the signed-in user in the audit log."""
    user = _signed_in()
    _audit(user.username if user else "anonymous", action, solution=solution, target=target, detail=detail)


def model_status_panel(solution: str) -> bool:
    """Show each default model of ``solution``: ready, or its training job with a progress bar.

    Returns True when every default model is ready.
    """
    from core.jobs import get_job
    from core.registry import load_manifest, model_states

    manifest = load_manifest(solution)
    if manifest is None:
        return True
    all_ready = True
    for model, ready in model_states(manifest):
        if ready:
            continue
        all_ready = False
        job = get_job(model.job_key)
        label = model.description or model.name
        if job is None:
            st.warning(f"Model **{label}** is not trained yet and no training job is queued. "
                       "Start the product with `verticals up` (it queues training) or run the train command.")
        elif job.status == "failed":
            st.error(f"Training **{label}** failed: {job.error}")
        elif job.status == "queued":
            st.info(f"Training **{label}** is queued; waiting for the training worker.")
        else:
            st.progress(min(max(job.progress, 0.0), 1.0), text=f"Training **{label}**: {job.message}")
    return all_ready
