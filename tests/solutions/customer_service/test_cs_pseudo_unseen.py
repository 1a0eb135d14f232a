"""Pseudo-unseen harness (``holdout --unseen-services``), decision overrides and one value, one slot."""

from __future__ import annotations

import json
import random

import pytest

from tests.solutions.customer_service.conftest import SHARED, TINY_SERVICE, tiny_service_data


def test_decision_overrides_refuse_training_settings() -> None:
    from solutions.customer_service.dst import TrackerConfig, with_decisions

    cfg = TrackerConfig()
    out = with_decisions(cfg, {"status_logit_bias_unseen": [1.0, 0, 0, 0, 0], "request_threshold": 0.5})
    assert out.status_logit_bias_unseen == [1.0, 0, 0, 0, 0] and out.request_threshold == 0.5
    assert cfg.request_threshold == 0.0  # a copy: the stored config is untouched
    with pytest.raises(ValueError, match="retrained heads"):
        with_decisions(cfg, {"epochs": 5})


def test_pseudo_unseen_split_holds_the_services_out_of_training(sgd_train) -> None:  # noqa: ANN001
    from solutions.customer_service.pipeline import pseudo_unseen_split

    held = ("Hotels_3", "Music_2")
    sample, keep, part0 = pseudo_unseen_split(SHARED, held, 6, 200, part=0, split=sgd_train)
    _, _, part1 = pseudo_unseen_split(SHARED, held, 6, 200, part=1, split=sgd_train)
    assert len(sample) == 200 and 0 < len(keep) < len(sample)
    assert not any(set(held) & set(d["services"]) for d in keep)
    ids0 = [d["dialogue_id"] for d in part0.dialogues]
    ids1 = [d["dialogue_id"] for d in part1.dialogues]
    assert len(ids0) == len(ids1) == 6 and not set(ids0) & set(ids1)  # disjoint parts
    assert not set(ids0) & {d["dialogue_id"] for d in sample}  # never a training dialogue
    assert all(set(held) & set(d["services"]) for d in part0.dialogues)
    assert ids0 == [d["dialogue_id"] for d in pseudo_unseen_split(SHARED, held, 6, 200, part=0, split=sgd_train)[2].dialogues]


def test_holdout_unseen_trains_once_and_scores_the_held_back_services(tmp_home, monkeypatch, sgd_train) -> None:  # noqa: ANN001
    from core.settings import get_settings
    from solutions.customer_service import pipeline as P
    from solutions.customer_service.encoder import MiniLMEncoder

    enc = MiniLMEncoder(cache_dir=None)
    held = ("Hotels_3",)
    calls = []
    from solutions.customer_service import dst_train

    orig = dst_train.train_tracker

    def counting(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(dst_train, "train_tracker", counting)
    out = P.holdout_unseen_dst(SHARED, held, n=2, train_dialogues=12, encoder=enc, epochs=1, ensemble=1,
                               split=sgd_train, decisions={"status_logit_bias_unseen": [2.0, 0, 0, 0, 0]})
    assert calls == [1]
    assert out["unseen_services"] == ["Hotels_3"] and out["dialogues"] == 2 and out["frames_unseen"] > 0
    assert "unseen" in out["errors"] and out["errors"]["unseen"]["frames"] == out["frames_unseen"]
    folders = list((get_settings().models_dir / "customer_service" / "dst-sgd-pseudo-unseen").iterdir())
    assert len(folders) == 1
    recipe = json.loads((folders[0] / "recipe.json").read_text())
    assert recipe["services"] == ["Hotels_3"] and recipe["kept_dialogues"] <= 12
    cfg = json.loads((folders[0] / "config.json").read_text())
    assert "Hotels_3" not in cfg["trained_services"] and cfg["train_dialogues"] == recipe["kept_dialogues"]
    # the decision override is for that run only; a second run reuses the stored heads
    assert cfg["status_logit_bias_unseen"] != [2.0, 0, 0, 0, 0]
    again = P.holdout_unseen_dst(SHARED, held, n=2, train_dialogues=12, encoder=enc, epochs=1, ensemble=1,
                                 split=sgd_train, breakdown=False)
    assert calls == [1] and "errors" not in again
    # heads cached under older decisions (not part of the key) read with the current recipe's decisions
    stale = {**cfg, "request_threshold_unseen": 9.0, "desc_mean": not cfg["desc_mean"]}
    (folders[0] / "config.json").write_text(json.dumps(stale))
    tracker = P.pseudo_unseen_tracker(SHARED, held, 12, 1, enc, split=sgd_train, epochs=1)
    assert calls == [1]
    want = P.default_tracker_config(ensemble=1, epochs=1)
    assert tracker.cfg.request_threshold_unseen == want.request_threshold_unseen != 9.0
    assert tracker.cfg.desc_mean is want.desc_mean
    assert tracker.cfg.trained_services == cfg["trained_services"]  # the heads' own training facts stay


def test_one_value_fills_one_slot() -> None:
    from solutions.customer_service.dst import unique_values

    fresh = [(1.0, "pickup_city", "sacramento"), (2.0, "pickup_location", "Sacramento"), (0.5, "pickup_date", "the 6th")]
    assert unique_values(fresh, {}, 1) == [("pickup_location", "Sacramento"), ("pickup_date", "the 6th")]
    # mode 2: not a value another slot of the service already holds (numbers excepted); mode 1 allows it
    kept = {"dropoff_date": ["The 6th"], "number_of_rooms": ["2"]}
    assert unique_values(fresh, kept, 2) == [("pickup_location", "Sacramento")]
    assert unique_values([(0.1, "number_of_days", "2")], kept, 2) == [("number_of_days", "2")]
    assert unique_values(fresh, kept, 1) == [("pickup_location", "Sacramento"), ("pickup_date", "the 6th")]
    assert unique_values([(0.3, "a", "x")], {"a": ["x"]}, 2) == [("a", "x")]  # the slot's own value is no clash


def test_unique_values_is_the_default_and_never_repeats_a_new_value(tiny_tracker_dir, sgd_train) -> None:  # noqa: ANN001
    from solutions.customer_service.dst import DialogueStateTracker, TrackerConfig, with_decisions
    from solutions.customer_service.encoder import MiniLMEncoder

    assert TrackerConfig().unique_values == 1
    pool, schemas = tiny_service_data(sgd_train)
    tr = DialogueStateTracker.load(tiny_tracker_dir / "dst-sgd", MiniLMEncoder(cache_dir=None))
    dialogues = random.Random(9).sample(pool, 3)
    uniq = DialogueStateTracker(tr.heads, with_decisions(tr.cfg, {"unique_values": 1}), tr.encoder).track_sgd(dialogues, schemas)
    assert tr.track_sgd(dialogues, schemas) == uniq
    off = DialogueStateTracker(tr.heads, with_decisions(tr.cfg, {"unique_values": 0}), tr.encoder).track_sgd(dialogues, schemas)
    assert len(off) == len(uniq)
    cat = {s["name"] for s in schemas[TINY_SERVICE]["slots"] if s.get("is_categorical")}
    for d in uniq:
        prev: dict = {}
        for t in d["turns"]:
            if t["speaker"] != "USER":
                continue
            sv = t["frames"][0]["state"]["slot_values"]
            new = [v[0].lower() for k, v in sv.items() if k not in cat and v != prev.get(k) and v[0] != "dontcare"]
            assert len(new) == len(set(new))
            prev = sv


def test_intent_slot_names_are_the_intents_arguments() -> None:
    from solutions.customer_service.dst import TrackerConfig, intent_slot_names

    assert TrackerConfig().intent_slots_only is True
    schema = {"slots": [{"name": n} for n in ("event_date", "event_name", "available_start_time")],
              "intents": [{"name": "GetAvailableTime", "required_slots": ["event_date"], "optional_slots": {},
                           "result_slots": ["event_date", "available_start_time"]},
                          {"name": "AddEvent", "required_slots": ["event_date"], "optional_slots": {"event_name": "x"}}]}
    assert intent_slot_names(schema) == {"event_date", "event_name"}


def test_intent_slots_only_never_fills_a_result_slot(tiny_tracker_dir, sgd_train) -> None:  # noqa: ANN001
    import copy

    from solutions.customer_service.dst import DialogueStateTracker, intent_slot_names, with_decisions
    from solutions.customer_service.encoder import MiniLMEncoder

    pool, schemas = tiny_service_data(sgd_train)
    for d in pool:  # the data's side of the rule: SGD states only hold intent arguments
        for t in d["turns"]:
            if t["speaker"] == "USER":
                assert set(t["frames"][0]["state"]["slot_values"]) <= intent_slot_names(schemas[TINY_SERVICE])
    tr = DialogueStateTracker.load(tiny_tracker_dir / "dst-sgd", MiniLMEncoder(cache_dir=None))
    dialogues = random.Random(9).sample(pool, 4)

    def filled(dec: dict, sch: dict) -> set[str]:
        t = DialogueStateTracker(tr.heads, with_decisions(tr.cfg, dec), tr.encoder)
        return {k for d in t.track_sgd(dialogues, sch) for turn in d["turns"] if turn["speaker"] == "USER"
                for k in turn["frames"][0]["state"]["slot_values"]}

    used = filled({"intent_slots_only": False}, schemas)
    assert used, "the tiny tracker fills no slot: nothing to check"
    # make a filled slot a result-only slot of a copied schema: the rule must drop it, off keeps it
    slot = sorted(used)[0]
    sch = copy.deepcopy(schemas)
    for it in sch[TINY_SERVICE]["intents"]:
        it["required_slots"] = [s for s in it["required_slots"] if s != slot]
        it["optional_slots"] = {s: v for s, v in it.get("optional_slots", {}).items() if s != slot}
    assert slot in filled({"intent_slots_only": False}, sch)
    assert slot not in filled({"intent_slots_only": True}, sch)


def test_unseen_non_argument_slots_take_only_offered_values(tiny_tracker_dir, sgd_train) -> None:  # noqa: ANN001
    import copy
    import dataclasses

    from solutions.customer_service.dst import DialogueStateTracker, TrackerConfig, with_decisions
    from solutions.customer_service.encoder import MiniLMEncoder

    assert TrackerConfig().offer_only_unseen is True
    pool, schemas = tiny_service_data(sgd_train)
    # a copy of the schema where searching takes no city (reserving still does, so the city stays an argument of
    # the service): users name the city while searching, which the rule must then refuse for an unseen service
    schemas = copy.deepcopy(schemas)
    schema = schemas[TINY_SERVICE]
    for it in schema["intents"]:
        if it["name"] == "FindRestaurants":
            it["required_slots"] = [x for x in it["required_slots"] if x != "city"]
    args = {it["name"]: {*it["required_slots"], *it.get("optional_slots", {})} for it in schema["intents"]}
    cat = {s["name"] for s in schema["slots"] if s.get("is_categorical")}
    tr = DialogueStateTracker.load(tiny_tracker_dir / "dst-sgd", MiniLMEncoder(cache_dir=None))
    unseen_cfg = dataclasses.replace(tr.cfg, trained_services=[])  # track its service as an unseen one
    dialogues = random.Random(5).sample(pool, 6)

    def user_only_fills(on: bool, cfg) -> int:  # noqa: ANN001
        t = DialogueStateTracker(tr.heads, with_decisions(cfg, {"offer_only_unseen": on}), tr.encoder)
        n, system = 0, ""
        for d in t.track_sgd(dialogues, schemas):
            prev: dict = {}
            for turn in d["turns"]:
                if turn["speaker"] != "USER":
                    system = turn["utterance"].lower()
                    continue
                st = turn["frames"][0]["state"]
                for k, v in st["slot_values"].items():
                    if (v != prev.get(k) and k not in cat and k not in args.get(st["active_intent"], set())
                            and v[0].lower() in turn["utterance"].lower() and v[0].lower() not in system):
                        n += 1
                prev = st["slot_values"]
        return n

    assert user_only_fills(True, unseen_cfg) == 0
    assert user_only_fills(False, unseen_cfg) > 0, "no user-side fill of a non-argument slot: nothing to check"
    assert user_only_fills(True, tr.cfg) == user_only_fills(False, tr.cfg)  # seen services: never applied
