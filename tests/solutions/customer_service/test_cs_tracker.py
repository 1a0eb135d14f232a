"""Tracker behaviour with a tiny model trained on real SGD dialogues: carry-over over 15+ turns,
corrections, services never seen in training (zero-shot from the schema), several services at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from solutions.customer_service.data import load_sgd, sgd_train_services
from solutions.customer_service.dst import DialogueStateTracker, encode_pairs, requested
from solutions.customer_service.encoder import MiniLMEncoder

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "customer_service"
TINY_SERVICE = "Restaurants_1"


@pytest.fixture(scope="module")
def tracker(tiny_tracker_dir: Path) -> DialogueStateTracker:
    return DialogueStateTracker.load(tiny_tracker_dir / "dst-sgd", MiniLMEncoder(cache_dir=tiny_tracker_dir / "cache"))


@pytest.fixture(scope="module")
def schemas() -> dict:
    s = dict(load_sgd(SHARED, "train").schemas)
    s.update(load_sgd(SHARED, "dev").schemas)
    return s


def run(tracker: DialogueStateTracker, schemas: dict, turns: list[tuple[str, str]], services: list[str],
        state: dict | None = None) -> list[dict]:
    bank = tracker.bank(schemas)
    feats = encode_pairs(tracker.encoder, [u for _, u in turns], [s for s, _ in turns])
    out, st = [], state or {}
    for (system, user), f in zip(turns, feats, strict=True):
        st = tracker.step(st, f, user, system, services, bank)
        out.append(st)
    return out


TURNS = [("", "I'd like to reserve a table at 7 pm in San Jose."),
         ("Which restaurant would you like?", "Sino, please.")]
FILLER = [("Is there anything else?", "Hmm, let me think for a second."),
          ("Sure, take your time.", "Okay."),
          ("Anything else I can do?", "Just a moment please.")] * 5  # 15 filler turns


def test_carry_over_15_turns(tracker: DialogueStateTracker, schemas: dict) -> None:
    states = run(tracker, schemas, TURNS + FILLER, [TINY_SERVICE])
    first = states[1][TINY_SERVICE]["slot_values"]
    assert first, "the tracker should fill slots from an explicit request"
    last = states[-1][TINY_SERVICE]["slot_values"]
    assert len(states) == 17 and last == first  # 15 turns later nothing was lost or invented


def test_correction_replaces_the_value(tracker: DialogueStateTracker, schemas: dict) -> None:
    states = run(tracker, schemas, TURNS, [TINY_SERVICE])
    first = states[-1][TINY_SERVICE]["slot_values"]
    fixed = run(tracker, schemas, [("Shall I book Sino at 7 pm?", "Actually, make it 8 pm instead.")],
                [TINY_SERVICE], state=states[-1])[-1][TINY_SERVICE]["slot_values"]
    assert "8" in fixed.get("time", [""])[0] and "7" not in fixed["time"][0]
    assert {k: v for k, v in fixed.items() if k != "time"} == {k: v for k, v in first.items() if k != "time"}


def test_unseen_service_is_tracked_from_its_schema(tracker: DialogueStateTracker, schemas: dict) -> None:
    unseen = "Alarm_1"
    assert unseen not in sgd_train_services(SHARED)
    st = run(tracker, schemas, [("", "Please set an alarm for 6:30 am called wake up.")], [unseen])[-1]
    frame = st[unseen]
    names = {i["name"] for i in schemas[unseen]["intents"]} | {"NONE"}
    slots = {s["name"] for s in schemas[unseen]["slots"]}
    assert frame["active_intent"] in names and set(frame["slot_values"]) <= slots
    assert set(frame["requested_slots"]) <= slots


def test_two_services_keep_separate_frames(tracker: DialogueStateTracker, schemas: dict) -> None:
    a = run(tracker, schemas, [("", "Book a table at 7 pm in Napa.")], [TINY_SERVICE])[-1]
    b = run(tracker, schemas, [("Done. Anything else?", "Yes, I also need a ride there.")], ["RideSharing_1"],
            state=a)[-1]
    assert b[TINY_SERVICE] == a[TINY_SERVICE]  # not touched while the customer talks about a ride
    assert "RideSharing_1" in b


def test_batched_heads_equal_one_turn_at_a_time(tracker: DialogueStateTracker) -> None:
    """``track_sgd`` steps the same turn of many dialogues through the heads in one call: the states must
    be exactly those of stepping every dialogue alone (seen and unseen services, several per turn)."""
    import random

    dev = load_sgd(SHARED, "dev")
    multi = [d for d in dev.dialogues if len(d["services"]) > 1]
    sample = random.Random(3).sample(multi, 4) + random.Random(3).sample(dev.dialogues, 4)
    alone = tracker.track_sgd(sample, dev.schemas, head_batch=1)
    together = tracker.track_sgd(sample, dev.schemas, head_batch=8)
    states = [[fr["state"] for t in d["turns"] for fr in t.get("frames", []) if t["speaker"] == "USER"]
              for d in together]
    assert states == [[fr["state"] for t in d["turns"] for fr in t.get("frames", []) if t["speaker"] == "USER"]
                      for d in alone]
    assert sum(len(s) for s in states) > 40 and any(fr["slot_values"] for s in states for fr in s)
    # the one-turn ``step`` path gives the same states too
    bank = tracker.bank(dev.schemas)
    d = together[0]
    user_turns = _pairs(d)
    feats = encode_pairs(tracker.encoder, [u for _, u, _ in user_turns], [s for _, _, s in user_turns])
    st, hist = {}, []
    for (t, user, system), f in zip(user_turns, feats, strict=True):
        st = tracker.step(st, f, user, system, [fr["service"] for fr in t["frames"]], bank, hist)
        hist.append((f, system))
        assert all(st[fr["service"]] == fr["state"] for fr in t["frames"])


def _pairs(d: dict) -> list[tuple[dict, str, str]]:
    system, out = "", []
    for t in d["turns"]:
        if t["speaker"] == "USER":
            out.append((t, t["utterance"], system))
        else:
            system = t["utterance"]
    return out


def test_request_threshold_of_unseen_services_leaves_seen_ones_alone(tracker: DialogueStateTracker,
                                                                      schemas: dict) -> None:
    turn = [("", "Set an alarm for 6:30 am and book a table in San Jose. What is their phone number?")]
    old, cap = tracker.cfg.request_threshold_unseen, tracker.cfg.max_requested_slots
    try:
        tracker.cfg.max_requested_slots = None
        tracker.cfg.request_threshold_unseen = -1e9  # every slot of the unseen service counts as requested
        st = run(tracker, schemas, turn, ["Alarm_1", TINY_SERVICE])[-1]
        assert set(st["Alarm_1"]["requested_slots"]) == {s["name"] for s in schemas["Alarm_1"]["slots"]}
        seen_req = st[TINY_SERVICE]["requested_slots"]
        assert len(seen_req) < len(schemas[TINY_SERVICE]["slots"])  # the seen service keeps its threshold
        tracker.cfg.request_threshold_unseen = 1e9
        st = run(tracker, schemas, turn, ["Alarm_1", TINY_SERVICE])[-1]
        assert st["Alarm_1"]["requested_slots"] == [] and st[TINY_SERVICE]["requested_slots"] == seen_req
    finally:
        tracker.cfg.request_threshold_unseen, tracker.cfg.max_requested_slots = old, cap


def test_requested_slots_are_capped_to_the_highest_logits() -> None:
    slots = [{"name": n} for n in ("a", "b", "c", "d")]
    logits = [0.5, 3.0, -2.0, 1.0]
    assert requested(slots, logits, 0.0, None) == ["a", "b", "d"]
    assert requested(slots, logits, 0.0, 2) == ["b", "d"]  # the two highest, in schema order
    assert requested(slots, logits, 2.0, 2) == ["b"]  # the cap never adds a slot under the threshold
    assert requested(slots, logits, 5.0, 2) == []


def test_tracker_caps_requested_slots(tracker: DialogueStateTracker, schemas: dict) -> None:
    turn = [("", "Book a table in San Jose. What is their phone number and address, and do they have live music?")]
    old_thr, old_cap = tracker.cfg.request_threshold, tracker.cfg.max_requested_slots
    try:
        tracker.cfg.request_threshold, tracker.cfg.max_requested_slots = -1e9, None
        every = run(tracker, schemas, turn, [TINY_SERVICE])[-1][TINY_SERVICE]["requested_slots"]
        assert every == [s["name"] for s in schemas[TINY_SERVICE]["slots"]]
        tracker.cfg.max_requested_slots = 2
        two = run(tracker, schemas, turn, [TINY_SERVICE])[-1][TINY_SERVICE]["requested_slots"]
        assert len(two) == 2 and set(two) <= set(every)
    finally:
        tracker.cfg.request_threshold, tracker.cfg.max_requested_slots = old_thr, old_cap


def test_holdout_scores_train_dialogues_outside_the_training_sample(tracker: DialogueStateTracker) -> None:
    import random

    from solutions.customer_service.pipeline import holdout_dst, holdout_sgd_dialogues

    held = holdout_sgd_dialogues(SHARED, 5, 8000)
    ids = [d["dialogue_id"] for d in held.dialogues]
    assert ids == [d["dialogue_id"] for d in holdout_sgd_dialogues(SHARED, 5, 8000).dialogues]  # seeded
    sample = {d["dialogue_id"] for d in random.Random(13).sample(load_sgd(SHARED, "train").dialogues, 8000)}
    assert len(set(ids)) == 5 and not set(ids) & sample  # never a training dialogue
    before, tracker.cfg.train_dialogues = tracker.cfg.train_dialogues, 8000  # as if trained on the default sample
    try:
        out = holdout_dst(SHARED, 2, tracker=tracker)
    finally:
        tracker.cfg.train_dialogues = before
    assert out["dialogues"] == 2 and 0.0 <= out["joint_goal_accuracy"] <= 1.0 and out["frames"] > 0
    # every failed frame is explained by at least one live slot error
    for b in out["errors"].values():
        assert b["frames_failed"] <= b["frames"]
        assert sum(b["frames_broken"].values()) >= b["frames_failed"] and sum(b["onsets"].values()) >= (b["frames_failed"] > 0)
