"""The SGD evaluator follows the official semantics (fuzzy non-categorical match, joint product,
requested-slot F1, seen/unseen split)."""

from __future__ import annotations

import math

from solutions.customer_service.sgd_eval import evaluate_dialogues, frame_metrics, requested_f1

SCHEMA = {"service_name": "Restaurants_9", "slots": [
    {"name": "city", "is_categorical": False, "possible_values": []},
    {"name": "party_size", "is_categorical": True, "possible_values": ["1", "2", "3"]},
    {"name": "time", "is_categorical": False, "possible_values": []}]}


def st(intent: str = "Reserve", req: list[str] | None = None, **slots: list[str]) -> dict:
    return {"active_intent": intent, "requested_slots": req or [], "slot_values": slots}


def test_exact_frame_scores_one() -> None:
    m = frame_metrics(st(city=["San Jose"], party_size=["2"]), st(city=["San Jose"], party_size=["2"]), SCHEMA)
    assert m == {"intent_accuracy": 1.0, "requested_slots_f1": 1.0, "average_goal_accuracy": 1.0,
                 "joint_goal_accuracy": 1.0}


def test_fuzzy_noncategorical_and_exact_categorical() -> None:
    m = frame_metrics(st(city=["San Jose"], party_size=["2"]), st(city=["san jose ca"], party_size=["3"]), SCHEMA)
    assert 0.4 < m["average_goal_accuracy"] < 0.5  # (fuzzy city ~0.84 + wrong categorical 0) / 2
    assert m["joint_goal_accuracy"] == 0.0
    m2 = frame_metrics(st(city=["San Jose"]), st(city=["Jose San"]), SCHEMA)
    assert m2["joint_goal_accuracy"] == 1.0  # token_sort_ratio ignores word order


def test_extra_hypothesis_slot_breaks_joint_only() -> None:
    m = frame_metrics(st(city=["Napa"]), st(city=["Napa"], time=["7 pm"]), SCHEMA)
    assert m["average_goal_accuracy"] == 1.0 and m["joint_goal_accuracy"] == 0.0
    assert math.isnan(frame_metrics(st(), st(), SCHEMA)["average_goal_accuracy"])


def test_requested_f1() -> None:
    assert requested_f1([], []) == 1.0
    assert requested_f1(["city"], []) == 0.0
    assert abs(requested_f1(["city", "time"], ["city"]) - 2 / 3) < 1e-9


def test_seen_unseen_split() -> None:
    def dial(svc: str, state: dict) -> dict:
        return {"turns": [{"speaker": "USER", "frames": [{"service": svc, "state": state}]}]}

    schemas = {"Restaurants_9": SCHEMA, "New_1": {**SCHEMA, "service_name": "New_1"}}
    refs = [dial("Restaurants_9", st(city=["A"])), dial("New_1", st(city=["B"]))]
    hyps = [dial("Restaurants_9", st(city=["A"])), dial("New_1", st(city=["zzz"]))]
    out = evaluate_dialogues(refs, hyps, schemas, seen_services={"Restaurants_9"})
    assert out["joint_goal_accuracy_seen"] == 1.0 and out["joint_goal_accuracy_unseen"] == 0.0
    assert out["joint_goal_accuracy"] == 0.5 and out["frames"] == 2


def test_slot_error_breakdown_kinds_and_onsets() -> None:
    from solutions.customer_service.sgd_eval import slot_error_breakdown

    def user(text: str, state: dict) -> dict:
        return {"speaker": "USER", "utterance": text, "frames": [{"service": "Restaurants_9", "state": state}]}

    def system(text: str) -> dict:
        return {"speaker": "SYSTEM", "utterance": text, "frames": []}

    ref = {"turns": [user("A table in San Jose for 2", st(city=["San Jose"], party_size=["2"])),
                     system("What time? Sino has one at 7 pm."),
                     user("That works", st(city=["San Jose"], party_size=["2"], time=["7 pm"])),
                     system("Done."),
                     user("Thanks", st(city=["San Jose"], party_size=["2"], time=["7 pm"]))]}
    hyp = {"turns": [user("", st(city=["San Jose CA downtown area"], party_size=["3"])),
                     system(""),
                     user("", st(city=["San Jose CA downtown area"], party_size=["3"], time=["Sino"])),
                     system(""),
                     user("", st(city=["San Jose CA downtown area"], party_size=["3"], time=["Sino"]))]}
    out = slot_error_breakdown([ref], [hyp], {"Restaurants_9": SCHEMA}, seen_services={"Restaurants_9"})["seen"]
    assert out["frames"] == 3 and out["frames_failed"] == 3
    # each error counted once at its onset, then on every frame it keeps breaking
    assert out["onsets"] == {"wrong_value:span_boundary:user": 1, "wrong_value:categorical:user": 1,
                             "wrong_value:wrong_entity:system": 1}
    assert out["frames_broken"]["wrong_value:categorical:user"] == 3
    assert out["frames_broken"]["wrong_value:wrong_entity:system"] == 2


def test_slot_error_breakdown_missed_and_false_updates() -> None:
    from solutions.customer_service.sgd_eval import slot_error_breakdown

    def user(text: str, state: dict) -> dict:
        return {"speaker": "USER", "utterance": text, "frames": [{"service": "Restaurants_9", "state": state}]}

    ref = {"turns": [user("In Napa", st(city=["Napa"])), user("ok", st(city=["Napa"])),
                     user("any time", st(city=["Napa"], time=["dontcare"]))]}
    hyp = {"turns": [user("", st()), user("", st(time=["noon"])), user("", st(time=["noon"]))]}
    out = slot_error_breakdown([ref], [hyp], {"Restaurants_9": SCHEMA}, seen_services=set())["unseen"]
    # city never filled: one onset (turn 1); time: false update of an empty slot at turn 2, then wrong at turn 3
    # without a new onset (the error was already live)
    assert out["onsets"] == {"update_missed:user": 1, "false_update:empty": 1}
    assert out["frames_broken"] == {"update_missed:user": 3, "false_update:empty": 2}
