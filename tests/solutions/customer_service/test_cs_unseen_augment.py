"""Schema-description augmentation of tracker training (``dst_augment``, ``desc_augment``)."""

from __future__ import annotations

import random

import numpy as np
import torch

from tests.solutions.customer_service.conftest import tiny_service_data

SCHEMA = {
    "service_name": "Buses_9", "description": "Book bus journeys",
    "slots": [{"name": "from_city", "description": "City the bus leaves from", "is_categorical": False,
               "possible_values": []},
              {"name": "group_size", "description": "Number of travellers", "is_categorical": True,
               "possible_values": ["1", "2", "3", "4"]}],
    "intents": [{"name": "FindBus", "description": "Find a bus between two cities", "required_slots": ["from_city"],
                 "optional_slots": {}}],
}


class _Enc:
    """Deterministic stand-in encoder: a hash-seeded unit vector per text."""

    def encode(self, texts):  # noqa: ANN001, ANN201
        out = []
        for t in texts:
            v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(384).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def test_variants_reword_the_description_without_its_exact_text() -> None:
    from solutions.customer_service.dst import schema_texts
    from solutions.customer_service.dst_augment import intent_variants, slot_variants, value_variants

    orig = schema_texts(SCHEMA)
    sv = slot_variants(SCHEMA, SCHEMA["slots"][0])
    assert "from city (buses: Book bus journeys)" in sv and "City the bus leaves from" in sv
    assert orig["slots"]["from_city"] not in sv
    assert any("for example 1, 2, 3" in v for v in slot_variants(SCHEMA, SCHEMA["slots"][1]))
    assert "find bus (buses: Book bus journeys)" in intent_variants(SCHEMA, SCHEMA["intents"][0])
    assert orig["values"]["group_size"]["2"] not in value_variants(SCHEMA, SCHEMA["slots"][1], "2")


def test_variant_rows_keep_the_bank_and_pick_swaps_only_described_rows() -> None:
    from solutions.customer_service.dst import SchemaBank
    from solutions.customer_service.dst_augment import N_VARIANTS, DescriptionVariants

    bank = SchemaBank({"Buses_9": SCHEMA}, _Enc(), full=True)
    var = DescriptionVariants(bank)
    n = bank.matrix.shape[0]
    assert torch.equal(var.matrix[:n], bank.matrix) and var.matrix.shape[0] > n
    rows = torch.tensor([bank.none_row, bank.slot_row("Buses_9", "from_city"), bank.intent_row("Buses_9", "FindBus")])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(var.pick(rows, 0.0, g), rows)
    out = var.pick(rows.repeat(50), 1.0, g).view(50, 3)
    assert (out[:, 0] == bank.none_row).all()  # NONE has no rewrite
    assert (out[:, 1:] >= n).all() and len(set(out[:, 1].tolist())) == N_VARIANTS
    vals = torch.tensor([[bank.value_row("Buses_9", "group_size", v) for v in ("1", "2", "3", "4")]] * 40)
    shared = var.pick(vals, 1.0, g, per_row=True)
    # one rewrite per example: the candidates' variant index is the same across the row
    idx = [[var.alt[vals[i, c]].tolist().index(int(shared[i, c])) for c in range(4)] for i in range(40)]
    assert all(len(set(r)) == 1 for r in idx) and len({r[0] for r in idx}) > 1


def test_desc_augment_changes_training_only_when_on(sgd_train) -> None:  # noqa: ANN001
    from solutions.customer_service.dst import TrackerConfig
    from solutions.customer_service.dst_train import train_tracker
    from solutions.customer_service.encoder import MiniLMEncoder

    pool, schemas = tiny_service_data(sgd_train)
    dialogues = random.Random(1).sample(pool, 4)
    enc = MiniLMEncoder(cache_dir=None)

    def weights(**over) -> dict[str, torch.Tensor]:  # noqa: ANN003
        cfg = TrackerConfig(epochs=1, **{k: v for k, v in over.items() if k != "aug"})
        if "aug" in over:
            cfg.desc_augment = over["aug"]  # also before the field exists on TrackerConfig
        return train_tracker(dialogues, schemas, enc, cfg).heads.state_dict()

    plain, off, on = weights(), weights(aug=0.0), weights(aug=1.0)
    assert all(torch.equal(plain[k], off[k]) for k in plain)  # 0 = bit-identical to the old recipe
    assert not all(torch.equal(plain[k], on[k]) for k in plain)


def test_mean_variant_bank_averages_only_described_texts() -> None:
    from solutions.customer_service.dst import SchemaBank, TrackerConfig
    from solutions.customer_service.dst_augment import MeanVariantBank, slot_variants, tracking_bank

    enc = _Enc()
    plain, mean = SchemaBank({"Buses_9": SCHEMA}, enc), MeanVariantBank({"Buses_9": SCHEMA}, enc)
    assert torch.equal(mean.none_intent, plain.none_intent)
    for b in (plain, mean):
        b.ensure(["Buses_9"])
    sl = SCHEMA["slots"][0]
    vs = torch.from_numpy(enc.encode([plain.texts["Buses_9"]["slots"]["from_city"], *slot_variants(SCHEMA, sl)]))
    want = vs.mean(0) / vs.mean(0).norm() * vs[0].norm()
    assert torch.allclose(mean.slot("Buses_9", "from_city"), want, atol=1e-6)
    assert not torch.allclose(mean.slot("Buses_9", "from_city"), plain.slot("Buses_9", "from_city"))
    assert not torch.allclose(mean.value("Buses_9", "group_size", "2"), plain.value("Buses_9", "group_size", "2"))
    cfg = TrackerConfig()
    assert type(tracking_bank({"Buses_9": SCHEMA}, enc, cfg)) is SchemaBank  # configs without the field
    cfg.desc_mean = True
    assert type(tracking_bank({"Buses_9": SCHEMA}, enc, cfg)) is MeanVariantBank


def test_default_recipe_carries_the_augmentation_and_old_configs_stay_off() -> None:
    from solutions.customer_service import pipeline as P
    from solutions.customer_service.dst import TrackerConfig

    cfg = P.default_tracker_config()
    assert cfg.desc_augment == P.DST_DESC_AUGMENT > 0 and cfg.desc_mean is P.DST_DESC_MEAN is True
    assert cfg.status_logit_bias_unseen == P.DST_UNSEEN_CARRY_WITH_MEAN
    old = TrackerConfig()  # what a config.json stored before the fields loads as
    assert old.desc_augment == 0.0 and old.desc_mean is False
