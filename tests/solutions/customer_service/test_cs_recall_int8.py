"""Tracker pieces added for SGD accuracy and speed: the ``recall`` status (a value the system offered a
few turns back), the per-turn token keys of the slot reader, and the int8 encoder variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from solutions.customer_service.dst import STATUS, SchemaBank, SlotReader, encode_pairs
from solutions.customer_service.dst_train import build_examples
from solutions.customer_service.encoder import MiniLMEncoder

SCHEMA = {
    "service_name": "Restaurants_9", "description": "Find and book restaurants",
    "slots": [{"name": "restaurant_name", "description": "Name of the restaurant", "is_categorical": False,
               "possible_values": []},
              {"name": "city", "description": "City of the restaurant", "is_categorical": False, "possible_values": []}],
    "intents": [{"name": "ReserveRestaurant", "description": "Reserve a table at a restaurant"}],
}


def _turn(speaker: str, text: str, values: dict | None = None, spans: list | None = None) -> dict:
    frame: dict = {"service": "Restaurants_9", "slots": spans or []}
    if speaker == "USER":
        frame["state"] = {"active_intent": "ReserveRestaurant", "requested_slots": [], "slot_values": values or {}}
    return {"speaker": speaker, "utterance": text, "frames": [frame]}


def test_value_offered_two_turns_back_is_a_recall_with_a_span_on_that_turn() -> None:
    offer = "How about Sino in San Jose?"
    dialogue = {"turns": [
        _turn("USER", "Find me a place to eat in San Jose.", {"city": ["San Jose"]}),
        _turn("SYSTEM", offer, spans=[{"slot": "restaurant_name", "start": 10, "exclusive_end": 14}]),
        _turn("USER", "What is their phone number?", {"city": ["San Jose"]}),
        _turn("SYSTEM", "Their number is 408-555-0199."),
        _turn("USER", "Okay, book it for me.", {"city": ["San Jose"], "restaurant_name": ["Sino"]}),
    ]}
    users = [t["utterance"] for t in dialogue["turns"] if t["speaker"] == "USER"]
    systems = ["", offer, "Their number is 408-555-0199."]
    enc = MiniLMEncoder()
    feats = encode_pairs(enc, users, systems)
    bank = SchemaBank({"Restaurants_9": SCHEMA}, enc, full=True)
    ex = build_examples([dialogue], feats, bank)
    name_row = bank.slot_row("Restaurants_9", "restaurant_name")
    labels = {(k, row): STATUS[y] for k, row, _, _, y, _ in ex.status}
    assert labels[(2, name_row)] == "recall"  # the last turn accepts the offer of turn 1's system
    assert labels[(1, name_row)] == "carry"   # asking for the phone number accepts nothing yet
    spans = [(k, a, b) for k, row, a, b in ex.span if row == name_row]
    assert len(spans) == 1
    k, a, b = spans[0]
    assert k == 1 and (feats[1].seg[a:b + 1] == 1).all()  # on the system side of the earlier pair
    start, end = feats[1].offsets[a][0], feats[1].offsets[b][1]
    assert offer[start:end] == "Sino"


def test_slot_reader_with_per_turn_keys_equals_the_expanded_computation() -> None:
    torch.manual_seed(0)
    reader = SlotReader(hidden=32, dropout=0.0).eval()
    turns, t, k = 3, 7, 5
    h = torch.randn(turns, t, 384)
    seg = (torch.arange(t) >= 4).long().expand(turns, -1).clone()
    mask = torch.ones(turns, t, dtype=torch.bool)
    mask[1, 5:] = False
    rows = torch.tensor([0, 1, 1, 2, 0])
    d, u, s = torch.randn(k, 384), torch.randn(k, 384), torch.randn(k, 384)
    has, cat = torch.tensor([0.0, 1, 0, 1, 0]), torch.tensor([1.0, 0, 0, 1, 1])
    with torch.no_grad():
        a = reader(h, seg, mask, d, u, s, has, cat, rows=rows)
        b = reader(h[rows], seg[rows], mask[rows], d, u, s, has, cat)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_int8_encoder_is_a_separate_cached_variant(tmp_path: Path) -> None:
    enc = MiniLMEncoder(cache_dir=tmp_path)
    q = enc.variant(True)
    assert q.quantized and q.variant(False) is enc and enc.variant(True) is q
    texts = ["I need a table for two at 7 pm", "book a cab to the airport"]
    a, b = enc.encode(texts), q.encode(texts)
    cos = (a * b).sum(-1)
    assert not np.allclose(a, b)  # really quantized: other features, hence other cache keys
    assert (cos > 0.8).all()      # but the same model
    assert np.allclose(MiniLMEncoder(cache_dir=tmp_path).variant(True).encode(texts), b, atol=2e-3)  # same variant
