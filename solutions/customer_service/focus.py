"""Conversation focus: a small graph of the intents (tasks) raised so far and their status.

Nodes are ``(service, intent)`` pairs from the tracker state; edges link each newly raised task to the
one in focus before it (``followed``). Status per node:
  ``open``       raised, required slots still missing or not yet confirmed
  ``satisfied``  every required slot of the intent has a value and the customer moved on or confirmed
  ``abandoned``  the customer switched to another task while this one still missed required slots,
                 and did not come back within ``abandon_after`` turns
The console shows the pending (open) tasks and the last 3 key nodes (most recently touched).

Data contract: ``FocusGraph.update(state, schemas, turn_index, user_text)``; ``to_dict()`` is
JSON-serialisable and ``FocusGraph.from_dict`` restores it (stored per turn in the DB).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["open", "satisfied", "abandoned"]
KEY_NODES = 3
CLOSING = re.compile(r"\b(that'?s all|no,? thanks?|thank you|bye|goodbye|that is all|nothing else)\b", re.I)


@dataclass
class FocusNode:
    service: str
    intent: str
    status: Status = "open"
    raised_turn: int = 0
    last_turn: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass
class FocusGraph:
    nodes: list[FocusNode] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)  # (from node, to node): "followed"
    current: int | None = None
    abandon_after: int = 2

    def _find(self, service: str, intent: str) -> int | None:
        for i, n in enumerate(self.nodes):
            if n.service == service and n.intent == intent:
                return i
        return None

    def update(self, state: dict[str, dict[str, Any]], schemas: dict[str, dict[str, Any]], turn: int,
               user_text: str = "", active_services: list[str] | None = None) -> None:
        """Advance the graph after the tracker produced ``state`` for user turn ``turn``."""
        touched = active_services if active_services is not None else list(state)
        for svc in touched:
            frame = state.get(svc)
            if not frame or frame.get("active_intent", "NONE") in ("NONE", "", None):
                continue
            intent = frame["active_intent"]
            idx = self._find(svc, intent)
            if idx is None:
                self.nodes.append(FocusNode(svc, intent, raised_turn=turn, last_turn=turn))
                idx = len(self.nodes) - 1
                if self.current is not None and self.current != idx:
                    self.edges.append((self.current, idx))
            node = self.nodes[idx]
            node.last_turn = turn
            node.missing = missing_slots(frame, schemas.get(svc), intent)
            if node.status == "abandoned":
                node.status = "open"  # the customer came back to it
            if not node.missing and (node.status == "open"):
                node.status = "satisfied" if _confirmed(frame, user_text) else "open"
            self.current = idx
        for i, n in enumerate(self.nodes):
            if i == self.current:
                continue
            if n.status == "open":
                if not n.missing:
                    n.status = "satisfied"  # complete and the customer moved on
                elif turn - n.last_turn >= self.abandon_after:
                    n.status = "abandoned"
        if CLOSING.search(user_text or "") and self.current is not None:
            cur = self.nodes[self.current]
            cur.status = "satisfied" if not cur.missing else "abandoned"

    def pending(self) -> list[FocusNode]:
        return [n for n in self.nodes if n.status == "open"]

    def key_nodes(self, k: int = KEY_NODES) -> list[FocusNode]:
        return sorted(self.nodes, key=lambda n: n.last_turn, reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [asdict(n) for n in self.nodes], "edges": [list(e) for e in self.edges],
                "current": self.current, "abandon_after": self.abandon_after}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FocusGraph:
        if not d:
            return cls()
        return cls(nodes=[FocusNode(**n) for n in d.get("nodes", [])],
                   edges=[(int(a), int(b)) for a, b in d.get("edges", [])],
                   current=d.get("current"), abandon_after=int(d.get("abandon_after", 2)))


def missing_slots(frame: dict[str, Any], schema: dict[str, Any] | None, intent: str) -> list[str]:
    if not schema:
        return []
    for it in schema.get("intents", []):
        if it["name"] == intent:
            return [s for s in it.get("required_slots", []) if s not in frame.get("slot_values", {})]
    return []


def _confirmed(frame: dict[str, Any], user_text: str) -> bool:
    return bool(re.search(r"\b(yes|yep|sure|correct|that works|sounds good|perfect|please do|confirm)\b",
                          user_text or "", re.I))
