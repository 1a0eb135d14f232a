"""bf16 matmuls in the frozen encoder (runtime CPU check, env override, same features as fp32) and the
decision biases for services the heads were never trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from solutions.customer_service.data import load_sgd
from solutions.customer_service.dst import DialogueStateTracker, encode_pairs
from solutions.customer_service.encoder import MiniLMEncoder, bf16_matmuls

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "customer_service"


def test_bf16_switch_follows_the_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_CS_ENCODER_BF16", "0")
    assert bf16_matmuls() is False and MiniLMEncoder().bf16 is False
    monkeypatch.setenv("VERTICALS_CS_ENCODER_BF16", "1")
    assert bf16_matmuls() is True and MiniLMEncoder().bf16 is True
    assert MiniLMEncoder(quantized=True).bf16 is False  # int8 keeps its own kernels


def test_auto_bf16_needs_native_support_and_a_measured_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from solutions.customer_service import encoder as E

    monkeypatch.setenv("VERTICALS_CS_ENCODER_BF16", "auto")
    assert isinstance(E._bf16_faster(), bool)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(E, "_bf16_faster", lambda: False)
    assert bf16_matmuls() is False  # native bf16 that is slower here (Intel AVX-512 BF16 without AMX)
    monkeypatch.setattr(E, "_bf16_faster", lambda: True)
    assert bf16_matmuls() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert bf16_matmuls() is False  # emulated bf16 (AVX2): never, whatever a timing says


def test_bf16_features_match_fp32_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # the fp32-trained heads run on bf16 features unchanged only because these are (nearly) the same
    monkeypatch.setenv("VERTICALS_CS_ENCODER_BF16", "0")
    fp32 = MiniLMEncoder()
    users, systems = ["I need a table for two at 7 pm in San Jose", "yes"], ["", "Shall I book Sino at 7 pm?"]
    a = encode_pairs(fp32, users, systems)
    b16 = MiniLMEncoder()
    b16._tok, b16._model, b16.bf16 = fp32.tokenizer, fp32._model, True
    b = encode_pairs(b16, users, systems)
    for x, y in zip(a, b, strict=True):
        hx, hy = x.h.astype(np.float32), y.h.astype(np.float32)
        cos = (hx * hy).sum(-1) / np.linalg.norm(hx, axis=-1) / np.linalg.norm(hy, axis=-1)
        assert x.offsets == y.offsets and (x.seg == y.seg).all()
        assert cos.min() > 0.995
        assert float(np.dot(x.u, y.u)) > 0.999


@pytest.fixture(scope="module")
def tracker(tiny_tracker_dir: Path) -> DialogueStateTracker:
    return DialogueStateTracker.load(tiny_tracker_dir / "dst-sgd", MiniLMEncoder(cache_dir=tiny_tracker_dir / "cache"))


def test_unseen_biases_apply_only_to_services_outside_training(tracker: DialogueStateTracker) -> None:
    schemas = dict(load_sgd(SHARED, "train").schemas)
    schemas.update(load_sgd(SHARED, "dev").schemas)
    seen, unseen = "Restaurants_1", "Restaurants_2"
    assert seen in tracker.cfg.trained_services and unseen not in tracker.cfg.trained_services
    bank = tracker.bank(schemas)
    user = "I'd like to reserve a table at 7 pm in San Jose at Sino for two people."
    f = encode_pairs(tracker.encoder, [user], [""])[0]

    def track() -> dict:
        return tracker.step({}, f, user, "", [seen, unseen], bank)

    base = track()
    assert base[seen]["slot_values"]
    tracker.cfg.status_logit_bias_unseen = [100.0, 0.0, 0.0, 0.0, 0.0]  # unseen services: always carry
    tracker.cfg.request_threshold = 100.0
    try:
        forced = track()
    finally:
        tracker.cfg.status_logit_bias_unseen, tracker.cfg.request_threshold = None, 0.0
    assert forced[unseen]["slot_values"] == {}
    assert forced[seen]["slot_values"] == base[seen]["slot_values"]  # seen services keep their biases
    assert forced[seen]["requested_slots"] == [] and forced[unseen]["requested_slots"] == []


def test_intent_reader_trains_saves_and_tracks(tmp_path: Path) -> None:
    import random

    import torch

    from solutions.customer_service.dst import TrackerConfig, TrackerHeads, intent_logits
    from solutions.customer_service.dst_train import train_tracker

    tr = load_sgd(SHARED, "train")
    svc = "Restaurants_1"
    dialogues = random.Random(1).sample([d for d in tr.dialogues if d["services"] == [svc]], 4)
    enc = MiniLMEncoder(cache_dir=tmp_path / "cache")
    tracker = train_tracker(dialogues, {svc: tr.schemas[svc]}, enc, TrackerConfig(epochs=1, intent_reader=True))
    assert tracker.heads.intent_reader is not None
    tracker.save(tmp_path / "dst")
    loaded = DialogueStateTracker.load(tmp_path / "dst", enc)
    assert loaded.cfg.intent_reader and loaded.heads.intent_reader is not None
    user = "I want to book a table at Sino at 7 pm."
    f = encode_pairs(enc, [user], [""])[0]
    st = loaded.step({}, f, user, "", [svc], loaded.bank({svc: tr.schemas[svc]}))
    assert st[svc]["active_intent"] in {"NONE"} | {i["name"] for i in tr.schemas[svc]["intents"]}
    # the reader's scores depend on the tokens: without them the head refuses instead of guessing
    u, s = torch.from_numpy(f.u).float(), torch.from_numpy(f.s).float()
    d = torch.randn(3, 384)
    with pytest.raises(ValueError, match="tokens"):
        intent_logits(loaded.heads, u, s, d, torch.zeros(3))
    g = encode_pairs(enc, ["What is the weather like in Paris tomorrow?"], [""])[0]
    with torch.no_grad():
        a = intent_logits(loaded.heads, u, s, d, torch.zeros(3), torch.from_numpy(f.h).float(),
                          torch.from_numpy(f.seg.astype(np.int64)))
        b = intent_logits(loaded.heads, u, s, d, torch.zeros(3), torch.from_numpy(g.h).float(),
                          torch.from_numpy(g.seg.astype(np.int64)))
    assert a.shape == (3,) and not torch.allclose(a, b)
    # configs stored before the reader existed load without it
    assert TrackerHeads(TrackerConfig()).intent_reader is None
