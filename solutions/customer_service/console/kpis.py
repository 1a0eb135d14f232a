"""KPIs: suggestion acceptance, handling time, share of conversations resolved without escalation."""

from __future__ import annotations

import streamlit as st

from core.console import require_user
from solutions.customer_service import store

require_user("agent")
st.title("KPIs")
k = store.kpis()
c1, c2, c3, c4 = st.columns(4)
c1.metric("Suggestion acceptance", "-" if k["acceptance"] is None else f"{k['acceptance']:.0%}",
          help="accepted / all rated suggestions")
c2.metric("Accepted or edited", "-" if k["accepted_or_edited"] is None else f"{k['accepted_or_edited']:.0%}")
c3.metric("Median handling time", "-" if k["handling_time_s_median"] is None else f"{k['handling_time_s_median']:.0f} s")
c4.metric("Resolved without escalation", "-" if k["resolved_without_escalation"] is None
          else f"{k['resolved_without_escalation']:.0%}")
st.caption(f"{k['conversations']} conversations, {k['suggestions_rated']} rated suggestions")
