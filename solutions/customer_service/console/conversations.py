"""Conversations: list with status, the conversation pane, the state panel and the suggestion."""

from __future__ import annotations

import streamlit as st

from core.console import audit, model_status_panel, require_user
from solutions.customer_service import store
from solutions.customer_service.console.common import SOLUTION, conversation_view, list_conversations
from solutions.customer_service.focus import FocusGraph

user = require_user("agent")
st.title("Conversations")
model_status_panel(SOLUTION)

status = st.sidebar.selectbox("Status", ["all", "open", "resolved", "escalated"], key="cs_status")
convs = list_conversations(status)
if not convs:
    st.info("No conversations yet. Import transcripts with `verticals customer-service import-sgd` "
            "or start the Simulator page.")
    st.stop()
st.dataframe([{k: v for k, v in c.items() if k != "id"} for c in convs], hide_index=True, use_container_width=True)
labels = {f"{c['conversation']} ({c['status']}, {c['turns']} turns)": c["id"] for c in convs}
choice = st.selectbox("Open conversation", list(labels), key="cs_conv")
cid = labels[choice]
turns = conversation_view(cid)

left, right = st.columns([3, 2])
with left:
    st.subheader("Conversation")
    for t in turns:
        with st.chat_message("user" if t["role"] == "customer" else "assistant"):
            st.write(t["text"][:3000] + (" …" if len(t["text"]) > 3000 else ""))
            if t["input_error"]:
                st.caption(f"⚠ {t['input_error']}")
            if t["state"] and t["state"]["status"] == "failed":
                st.caption(f"tracking failed: {t['state']['error']}")
            if t["state"] and t["state"]["flagged"]:
                st.caption("⚠ instruction-like text removed before tracking (prompt-injection guard)")
    c1, c2 = st.columns(2)
    if c1.button("Mark resolved", key="cs_resolve"):
        store.set_status(cid, "resolved")
        audit("resolve", target=str(cid), solution=SOLUTION)
        st.rerun()
    if c2.button("Escalate", key="cs_escalate"):
        store.set_status(cid, "escalated")
        audit("escalate", target=str(cid), solution=SOLUTION)
        st.rerun()

tracked = [t for t in turns if t["state"] and t["state"]["status"] == "ok"]
with right:
    st.subheader("State")
    if not tracked:
        st.info("No tracked customer turn yet (the worker processes turns as they arrive).")
    else:
        last = tracked[-1]
        for svc, fr in last["state"]["state"].items():
            st.markdown(f"**{svc}** · intent `{fr.get('active_intent')}`")
            if fr.get("slot_values"):
                st.table({k: v[0] if v else "" for k, v in fr["slot_values"].items()})
            if fr.get("requested_slots"):
                st.caption("asks for: " + ", ".join(fr["requested_slots"]))
        graph = FocusGraph.from_dict(last["state"]["focus"])
        st.markdown("**Pending tasks**")
        pend = graph.pending()
        st.write(", ".join(f"{n.intent} (missing: {', '.join(n.missing) or '-'})" for n in pend) or "none")
        st.caption("Last key nodes: " + " → ".join(f"{n.intent} [{n.status}]" for n in graph.key_nodes()))
        sug = last["suggestion"]
        if sug:
            st.subheader("Suggestion")
            st.markdown(f"Next action: `{sug['next_action'] or '-'}`")
            text = st.text_area("Reply (edit before sending)", sug["reply"], key=f"cs_reply_{sug['id']}")
            if sug["ungrounded"]:
                st.caption("masked ungrounded facts: " + ", ".join(sug["ungrounded"]))
            a, e, r = st.columns(3)
            verdict = None
            if a.button("Accept", key="cs_accept"):
                verdict = "accepted"
            if e.button("Send edited", key="cs_edit"):
                verdict = "edited" if text.strip() != sug["reply"].strip() else "accepted"
            if r.button("Reject", key="cs_reject"):
                verdict = "rejected"
            if verdict:
                final = text if verdict != "rejected" else ""
                store.record_feedback(sug["id"], verdict, final, agent=user.username)
                if final:
                    store.add_turn(cid, "agent", final)
                audit(f"suggestion_{verdict}", target=str(sug["id"]), solution=SOLUTION)
                st.success(f"feedback recorded: {verdict}")
