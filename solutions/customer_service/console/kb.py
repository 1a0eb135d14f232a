"""Knowledge base: search snippets (what the reply suggestion retrieves) and add FAQ entries."""

from __future__ import annotations

import streamlit as st
from sqlalchemy import select

from core.console import audit, require_user
from core.db import session_scope
from core.settings import get_settings
from solutions.customer_service import data as D
from solutions.customer_service import store
from solutions.customer_service.orm import KBArticle
from solutions.customer_service.reply import KBEntry, KnowledgeBase

require_user("agent")
st.title("Knowledge base")


@st.cache_resource
def _kb(n_db: int) -> KnowledgeBase:
    from solutions.customer_service.encoder import default_encoder

    entries = [KBEntry(f"star:{k}", k, v)
               for k, v in D.star_responses(get_settings().data_root / "customer_service").items()]
    with session_scope() as s:
        entries += [KBEntry(f"kb:{a.key}", a.title, a.text) for a in s.scalars(select(KBArticle))]
    return KnowledgeBase(entries, default_encoder())


with session_scope() as s:
    n_db = len(list(s.scalars(select(KBArticle.id))))
query = st.text_input("Search", key="cs_kb_query")
if query:
    for entry, score in _kb(n_db).search(query, k=5):
        st.markdown(f"**{entry.title}** · {score:.2f}  \n{entry.text}")

with st.form("cs_kb_add"):
    st.subheader("Add an entry")
    title = st.text_input("Title")
    text = st.text_area("Text")
    if st.form_submit_button("Save") and title.strip() and text.strip():
        store.upsert_kb(title.strip().lower().replace(" ", "_")[:200], title.strip(), text.strip())
        audit("kb_add", target=title[:200], solution="customer_service")
        st.success("saved")
