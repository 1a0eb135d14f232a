"""PII masking of stored text and the conversation focus graph."""

from __future__ import annotations

from solutions.customer_service.focus import FocusGraph
from solutions.customer_service.pii import mask_pii


def test_masks_cards_emails_phones_but_not_ordinary_numbers() -> None:
    t = ("Card 4111 1111 1111 1111, mail jo.doe@example.com, call +1 415-555-0132. "
         "Table for 4 at 19:30 on 2019-03-01, order 1234567890123.")
    m = mask_pii(t)
    assert "[CARD]" in m and "4111" not in m
    assert "[EMAIL]" in m and "example.com" not in m
    assert "[PHONE]" in m and "555-0132" not in m
    assert "19:30" in m and "2019-03-01" in m and "1234567890123" in m  # Luhn-invalid, not a phone


SCHEMAS = {"Restaurants_1": {"intents": [{"name": "ReserveRestaurant", "required_slots": ["city", "time"]}]},
           "Movies_1": {"intents": [{"name": "FindMovies", "required_slots": ["location"]}]}}


def frame(intent: str, **slots: str) -> dict:
    return {"active_intent": intent, "requested_slots": [], "slot_values": {k: [v] for k, v in slots.items()}}


def test_focus_open_satisfied_abandoned() -> None:
    g = FocusGraph()
    g.update({"Restaurants_1": frame("ReserveRestaurant", city="Napa")}, SCHEMAS, 1, "book a table in Napa",
             ["Restaurants_1"])
    assert [n.status for n in g.nodes] == ["open"] and g.nodes[0].missing == ["time"]
    state = {"Restaurants_1": frame("ReserveRestaurant", city="Napa"), "Movies_1": frame("FindMovies")}
    for turn in (2, 3, 4):
        g.update(state, SCHEMAS, turn, "what movies are on", ["Movies_1"])
    assert g.nodes[0].status == "abandoned"  # switched away with 'time' still missing
    assert [n.intent for n in g.pending()] == ["FindMovies"]
    state["Restaurants_1"] = frame("ReserveRestaurant", city="Napa", time="7 pm")
    g.update(state, SCHEMAS, 5, "back to the table: 7 pm, yes please", ["Restaurants_1"])
    assert g.nodes[0].status == "satisfied"
    assert g.edges == [(0, 1), ] and len(g.key_nodes()) == 2
    restored = FocusGraph.from_dict(g.to_dict())
    assert restored.to_dict() == g.to_dict()
