"""Was-active flag noise of the intent head's training (``intent_flag_noise``): a share of the examples
sees the flag on another real intent of the same service (a simulated earlier tracking error)."""

from __future__ import annotations

import torch

from solutions.customer_service.dst_train import perturb_flags


def _flags() -> tuple[torch.Tensor, torch.Tensor]:
    # rows: previous intent NONE (col 0) in a 3-intent service; a real intent of a 3-intent service; the only
    # real intent of a 1-intent service (nowhere to move); a 2-intent service padded to 4 columns
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    was = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.float32)
    return was, valid


def test_every_movable_flag_moves_to_another_real_intent_at_p_one() -> None:
    was, valid = _flags()
    torch.manual_seed(0)
    for _ in range(50):
        out = perturb_flags(was, valid, 1.0)
        assert torch.equal(out.sum(1), torch.ones(4))  # still exactly one flag per example
        assert not (out.bool() & ~valid).any()  # never on a padded candidate
        assert not out[:, 0].bool().any()  # never moved onto NONE
        for r in (0, 1, 3):
            assert not torch.equal(out[r], was[r])  # moved away from the reference's previous intent
        assert torch.equal(out[2], was[2])  # a 1-intent service has no other intent to move to


def test_no_noise_keeps_the_reference_flags_and_a_share_moves_otherwise() -> None:
    was, valid = _flags()
    assert perturb_flags(was, valid, 0.0) is was
    torch.manual_seed(1)
    big_was, big_valid = was.repeat(500, 1), valid.repeat(500, 1)
    moved = (perturb_flags(big_was, big_valid, 0.2) != big_was).any(1).float()
    movable = torch.tensor([1.0, 1.0, 0.0, 1.0]).repeat(500)
    assert moved[movable == 0].sum() == 0
    assert 0.15 < float(moved[movable == 1].mean()) < 0.25


def test_flag_noise_changes_only_the_intent_head_in_training(tmp_path) -> None:
    """The noise draws from its own stream: every other head trains bit-identically with and without it
    (a noisy run is then no new retraining draw of the slot and request heads)."""
    import random

    from solutions.customer_service.dst import TrackerConfig
    from solutions.customer_service.dst_train import train_tracker
    from solutions.customer_service.encoder import MiniLMEncoder
    from tests.solutions.customer_service.conftest import tiny_service_data

    pool, schemas = tiny_service_data()
    dialogues = random.Random(2).sample(pool, 4)
    enc = MiniLMEncoder(cache_dir=tmp_path / "cache")
    heads = [train_tracker(dialogues, schemas, enc,
                           TrackerConfig(epochs=1, intent_flag_noise=noise)).heads.state_dict()
             for noise in (0.0, 0.5)]
    intent = [k for k in heads[0] if k.startswith("intent.")]
    assert intent and any(not torch.equal(heads[0][k], heads[1][k]) for k in intent)
    for k in heads[0]:
        if not k.startswith("intent"):
            assert torch.equal(heads[0][k], heads[1][k]), k
