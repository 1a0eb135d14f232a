"""Agent assist for one customer turn: guard -> track state -> focus graph -> next action -> reply.

Pure domain logic (no DB, Celery or Streamlit): ``tasks.py`` feeds it stored turns and writes the
result back. The service catalogue is the SGD schema set (train + dev services); a conversation's
services are the ones it was imported with, plus the best-scoring service of each turn's intent
head when none is known (so a new conversation finds its service zero-shot from the descriptions).

Data contract: ``AgentAssist.process(history, prev_state, prev_focus, services) -> AssistResult``
where ``history`` is ``[(role, text)]`` ending with the customer turn to process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solutions.customer_service.dst import RECALL_TURNS, DialogueStateTracker, encode_pairs, intent_logits
from solutions.customer_service.encoder import MiniLMEncoder
from solutions.customer_service.focus import FocusGraph
from solutions.customer_service.reply import (
    KBEntry,
    KnowledgeBase,
    ReplyInput,
    build_reply_chain,
    strip_injection,
)
from solutions.customer_service.store import TRACK_CHARS


@dataclass
class AssistResult:
    state: dict[str, Any]
    focus: dict[str, Any]
    services: list[str]
    next_action: str
    reply: str
    snippets: list[str] = field(default_factory=list)
    ungrounded: list[str] = field(default_factory=list)
    flagged_injection: bool = False
    model: str = ""
    latency_ms: float = 0.0


def load_catalogue(data_root: Path) -> dict[str, dict[str, Any]]:
    """Every SGD service schema available (train + dev): the product's service catalogue."""
    from solutions.customer_service.data import _read_json

    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "dev"):
        p = Path(data_root) / "sgd" / split / "schema.json"
        if p.exists():
            out.update({s["service_name"]: s for s in _read_json(p)})
    return out


class AgentAssist:
    def __init__(self, tracker: DialogueStateTracker, schemas: dict[str, dict[str, Any]],
                 actions: dict[str, Any] | None, kb_entries: list[KBEntry], chat_model: Any = None) -> None:
        self.tracker = tracker
        self.schemas = schemas
        self.bank = tracker.bank(schemas)
        self.actions = actions
        # KB retrieval and the next-action model read fp32 sentence embeddings (what they were built on);
        # the tracker reads its own encoder variant (``tracker.encoder``, possibly int8).
        self.encoder: MiniLMEncoder = tracker.encoder.variant(False)
        self.kb = KnowledgeBase(kb_entries, self.encoder)
        self.chain = build_reply_chain(self.kb, chat_model)
        self._pair_cache: dict[tuple[str, str], Any] = {}

    @torch.inference_mode()
    def detect_service(self, u: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None = None,
                       seg: torch.Tensor | None = None) -> str:
        """Service whose best intent (not NONE) scores highest for this turn (``h``/``seg``: the turn's
        tokens, read by trackers with an intent reader)."""
        names, ds = [], []
        for svc in self.schemas:
            for it in self.schemas[svc]["intents"]:
                names.append(svc)
                ds.append(self.bank.intent(svc, it["name"]))
        d = torch.stack(ds)
        lg = intent_logits(self.tracker.heads, u, s, d, torch.zeros(len(names)), h, seg)
        return names[int(lg.argmax())]

    def _earlier_pairs(self, history: list[tuple[str, str]]) -> list[tuple[Any, str]]:
        """(features, agent text) of the last RECALL_TURNS earlier (customer, preceding agent) pairs, for
        the tracker's ``recall`` of values offered a few turns back. Pairs encoded for earlier turns are
        kept in a small in-process cache, so a live conversation encodes each pair once."""
        pairs, agent = [], ""
        for role, text in history:
            if role == "agent":
                agent = text[-TRACK_CHARS:]
            else:
                pairs.append((strip_injection(text[-TRACK_CHARS:])[0] or " ", agent))
        pairs = pairs[-RECALL_TURNS:]
        todo = [p for p in pairs if p not in self._pair_cache]
        if todo:
            for p, f in zip(todo, encode_pairs(self.tracker.encoder, [u for u, _ in todo], [a for _, a in todo]),
                            strict=True):
                self._pair_cache[p] = f
            while len(self._pair_cache) > 512:
                self._pair_cache.pop(next(iter(self._pair_cache)))
        return [(self._pair_cache[p], p[1]) for p in pairs]

    def next_action(self, user: str, prev_agent: str) -> str:
        if not self.actions:
            return ""
        import numpy as np

        x = np.hstack([self.encoder.encode([user or " "]), self.encoder.encode([prev_agent or " "])])
        return str(self.actions["clf"].predict(x)[0])

    def process(self, history: list[tuple[str, str]], prev_state: dict[str, Any], prev_focus: dict[str, Any],
                services: list[str] | None = None) -> AssistResult:
        t0 = time.perf_counter()
        if not history or history[-1][0] != "customer":
            raise ValueError("history must end with the customer turn to process")
        raw_user = history[-1][1][-TRACK_CHARS:]
        user, flagged = strip_injection(raw_user)
        system = next((t for r, t in reversed(history[:-1]) if r == "agent"), "")[-TRACK_CHARS:]
        feats = encode_pairs(self.tracker.encoder, [user or " "], [system])[0]
        svcs = [s for s in (services or []) if s in self.schemas]
        if not svcs:
            known = [s for s in prev_state if s in self.schemas]
            detected = self.detect_service(torch.from_numpy(feats.u).float(), torch.from_numpy(feats.s).float(),
                                           torch.from_numpy(feats.h).float(),
                                           torch.from_numpy(feats.seg.astype(np.int64)))
            svcs = sorted(set(known) | {detected})
        past = self._earlier_pairs(history[:-1])
        state = self.tracker.step(prev_state, feats, user, system, svcs, self.bank, past) if user else dict(prev_state)
        focus = FocusGraph.from_dict(prev_focus)
        turn_no = sum(1 for r, _ in history if r == "customer")
        focus.update(state, self.schemas, turn_no, user, active_services=svcs)
        action = self.next_action(user, system)
        sug = self.chain.invoke(ReplyInput(history=[*history[:-1], ("customer", user)], state=state, next_action=action))
        return AssistResult(state=state, focus=focus.to_dict(), services=svcs, next_action=action, reply=sug.text,
                            snippets=sug.snippets, ungrounded=sug.ungrounded, flagged_injection=flagged or sug.flagged_injection,
                            model=sug.model, latency_ms=round((time.perf_counter() - t0) * 1000, 1))
