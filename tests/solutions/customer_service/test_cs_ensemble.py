"""Seed ensemble of the tracker's intent and slot heads (``TrackerConfig.ensemble``): extra members are
trained after the main heads from their own seeds, and their logits are averaged with the main heads'."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from solutions.customer_service.dst import (
    DialogueStateTracker,
    TrackerConfig,
    TrackerHeads,
    encode_pairs,
    intent_logits,
)
from solutions.customer_service.encoder import MiniLMEncoder
from tests.solutions.customer_service.conftest import tiny_service_data


def _states(tracked: list[dict]) -> list:
    return [fr["state"] for d in tracked for t in d["turns"] if t["speaker"] == "USER" for fr in t["frames"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pool, schemas = tiny_service_data()
    from solutions.customer_service.dst_train import train_tracker

    tmp = tmp_path_factory.mktemp("cs_ensemble")
    dialogues = random.Random(2).sample(pool, 4)
    enc = MiniLMEncoder(cache_dir=tmp / "cache")
    out = {"enc": enc, "schemas": schemas, "dev": random.Random(5).sample(pool, 3), "tmp": tmp}
    for n in (1, 3):
        out[n] = train_tracker(dialogues, schemas, enc,
                               TrackerConfig(epochs=1, intent_reader=True, intent_flag_noise=0.15, ensemble=n))
    return out


def test_members_train_after_the_main_heads_which_stay_as_without_ensemble(trained: dict) -> None:
    single, ens = trained[1].heads.state_dict(), trained[3].heads.state_dict()
    main = {k: v for k, v in ens.items() if not k.startswith("members.")}
    assert main.keys() == single.keys()
    for k in single:
        assert torch.equal(single[k], main[k]), k  # the main heads are bit-identical to a 1-member training
    assert len(trained[3].heads.members) == 2
    for i in (0, 1):  # each member has its own weights (own seed), trained (not the initialisation)
        w = ens[f"members.{i}.intent.1.weight"]
        assert not torch.equal(w, ens["intent.1.weight"])
        fresh = TrackerHeads(TrackerConfig(intent_reader=True, ensemble=3)).state_dict()[f"members.{i}.intent.1.weight"]
        assert not torch.equal(w, fresh)
    assert not torch.equal(ens["members.0.slot.out.1.weight"], ens["members.1.slot.out.1.weight"])


def test_ensemble_logits_are_the_members_mean(trained: dict) -> None:
    tk = trained[3]
    f = encode_pairs(tk.encoder, ["I want a table for two in San Jose, what's their number?"], ["Hello."])[0]
    h, seg = torch.from_numpy(f.h).float(), torch.from_numpy(f.seg.astype("int64"))
    u, s = torch.from_numpy(f.u).float(), torch.from_numpy(f.s).float()
    d = torch.randn(3, 384)
    was = torch.tensor([0.0, 1.0, 0.0])
    with torch.inference_mode():
        both = intent_logits(tk.heads, u, s, d, was, h, seg)
        members = tk.heads.members
        parts = []
        solo = copy.deepcopy(tk.heads)
        solo.members = torch.nn.ModuleList()
        parts.append(intent_logits(solo, u, s, d, was, h, seg))
        for mem in members:
            one = copy.deepcopy(solo)
            one.intent_reader, one.intent = mem.intent_reader, mem.intent
            parts.append(intent_logits(one, u, s, d, was, h, seg))
        assert torch.allclose(both, torch.stack(parts).mean(0), atol=1e-5)
        # slot reader: request logits always averaged, status logits only with ``ensemble_status``
        args = (h[None], seg[None], torch.ones(1, len(seg), dtype=torch.bool), torch.randn(2, 384), u.expand(2, -1),
                s.expand(2, -1), torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long))
        outs = [tk.heads.slot(*args)] + [m.slot(*args) for m in members]
        st, rq = tk.heads.slot_logits(*args)
        assert torch.allclose(rq, torch.stack([o[1] for o in outs]).mean(0), atol=1e-5)
        assert torch.allclose(st, torch.stack([o[0] for o in outs]).mean(0), atol=1e-5)
        tk.heads.ensemble_status = False
        try:
            st2, rq2 = tk.heads.slot_logits(*args)
        finally:
            tk.heads.ensemble_status = True
        assert torch.equal(st2, outs[0][0]) and torch.allclose(rq2, rq)


def test_ensemble_of_copies_tracks_like_one_model_and_round_trips(trained: dict) -> None:
    single, enc, schemas, dev = trained[1], trained["enc"], trained["schemas"], trained["dev"]
    ref = _states(single.track_sgd(dev, schemas))
    # members that are copies of the main heads: the mean equals the main heads' logits -> same states
    heads = copy.deepcopy(single.heads)
    heads.members = torch.nn.ModuleList()
    for _ in range(2):
        m = type(trained[3].heads.members[0])(TrackerConfig(intent_reader=True))
        m.intent_reader, m.intent, m.slot = (copy.deepcopy(heads.intent_reader), copy.deepcopy(heads.intent),
                                            copy.deepcopy(heads.slot))
        heads.members.append(m)
    assert _states(DialogueStateTracker(heads, single.cfg, enc).track_sgd(dev, schemas)) == ref
    # a real ensemble saves and loads with its members
    folder = trained["tmp"] / "ens"
    trained[3].save(folder)
    assert json.loads((folder / "config.json").read_text())["ensemble"] == 3
    loaded = DialogueStateTracker.load(folder, enc)
    assert len(loaded.heads.members) == 2
    assert _states(loaded.track_sgd(dev, schemas)) == _states(trained[3].track_sgd(dev, schemas))


def test_config_stored_before_the_ensemble_loads_as_one_member(trained: dict, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    trained[1].save(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("ensemble")
    raw.pop("ensemble_status")
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = DialogueStateTracker.load(folder, trained["enc"])
    assert loaded.cfg.ensemble == 1 and len(loaded.heads.members) == 0


def test_ensemble_values_members_get_value_and_span_heads_and_resume_equals_scratch(trained: dict) -> None:
    from solutions.customer_service.dst_train import train_tracker

    pool, schemas = tiny_service_data()
    dialogues = random.Random(2).sample(pool, 4)
    cfg = dict(epochs=1, intent_reader=True, intent_flag_noise=0.15, ensemble=3, ensemble_values=True)
    scratch = train_tracker(dialogues, schemas, trained["enc"], TrackerConfig(**cfg))
    sd, old = scratch.heads.state_dict(), trained[3].heads.state_dict()
    # every head of the ensemble without value members trains exactly as before
    assert set(old) < set(sd)
    for k in old:
        assert torch.equal(sd[k], old[k]), k
    new = sorted(set(sd) - set(old))
    assert new and all(k.startswith(("members.0.value", "members.0.span", "members.1.value", "members.1.span"))
                       for k in new)
    fresh = TrackerHeads(TrackerConfig(**cfg)).state_dict()
    assert not torch.equal(sd["members.0.value.1.weight"], fresh["members.0.value.1.weight"])  # trained
    assert not torch.equal(sd["members.0.span.tok.1.weight"], sd["members.1.span.tok.1.weight"])  # own seeds
    # resuming from the stored 3-member heads trains only the missing value / span heads: same weights
    resumed = train_tracker(dialogues, schemas, trained["enc"], TrackerConfig(**cfg), base=trained[3].heads)
    for k, v in resumed.heads.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # value and span logits are the members' mean
    h, x = torch.randn(2, 7, 384), torch.randn(5, 5 * 384 + 2)
    heads = scratch.heads
    with torch.inference_mode():
        assert torch.allclose(heads.value_logits(x), torch.stack([m.value(x) for m in [heads, *heads.members]]).mean(0),
                              atol=1e-5)
        d = torch.randn(2, 384)
        assert torch.allclose(heads.span_logits(h, d), torch.stack([m.span(h, d) for m in [heads, *heads.members]]).mean(0),
                              atol=1e-5)
        assert not torch.allclose(heads.span_logits(h, d), heads.span(h, d))


def test_config_stored_before_value_members_loads_without_them(trained: dict, tmp_path: Path) -> None:
    folder = tmp_path / "old3"
    trained[3].save(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("ensemble_values")
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = DialogueStateTracker.load(folder, trained["enc"])
    assert not loaded.cfg.ensemble_values and not loaded.heads.ensemble_values
    assert not hasattr(loaded.heads.members[0], "value")
    dev, schemas = trained["dev"], trained["schemas"]
    assert _states(loaded.track_sgd(dev, schemas)) == _states(trained[3].track_sgd(dev, schemas))
