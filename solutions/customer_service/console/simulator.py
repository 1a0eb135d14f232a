"""Simulator: feeds real SGD dev dialogues turn by turn as if a customer were typing (for demos).

Each click appends the next customer message (and the recorded agent reply before it) to a
conversation and queues ``customer_service.process_turn`` on the worker.
"""

from __future__ import annotations

import streamlit as st

from core.console import audit, require_user
from core.settings import get_settings
from solutions.customer_service import data as D
from solutions.customer_service import store

require_user("agent")
st.title("Simulator")
st.caption("Replays real dialogues from the SGD dev split; the worker tracks each customer turn.")


@st.cache_resource
def _dialogues(n: int) -> list[dict]:
    return D.load_sgd(get_settings().data_root / "customer_service", "dev", limit=n).dialogues


try:
    dialogues = _dialogues(50)
except Exception as e:  # missing data: say so on the page
    st.error(str(e))
    st.stop()
ids = [d["dialogue_id"] for d in dialogues]
did = st.selectbox("Dialogue", ids, key="cs_sim_dialogue")
dialogue = dialogues[ids.index(did)]
key = f"sim-{did}"
pos = st.session_state.setdefault(f"cs_sim_pos_{did}", 0)
turns = dialogue["turns"]
st.progress(pos / len(turns), text=f"{pos}/{len(turns)} messages sent")
if st.button("Send next customer message", key="cs_sim_next", disabled=pos >= len(turns)):
    cid = store.get_or_create_conversation(key, services=dialogue["services"])
    tid = None
    while pos < len(turns):
        t = turns[pos]
        tid = store.add_turn(cid, "customer" if t["speaker"] == "USER" else "agent", t["utterance"])
        pos += 1
        if t["speaker"] == "USER":
            break
    st.session_state[f"cs_sim_pos_{did}"] = pos
    if tid is not None:
        from core.queue import app

        app.send_task("customer_service.process_turn", kwargs={"conversation_id": cid, "turn_id": tid})
        audit("simulate_turn", target=key, solution="customer_service")
    st.rerun()
if pos:
    st.write(f"Open conversation **{key}** on the Conversations page to see the state and suggestions.")
for t in turns[:pos]:
    with st.chat_message("user" if t["speaker"] == "USER" else "assistant"):
        st.write(t["utterance"])
