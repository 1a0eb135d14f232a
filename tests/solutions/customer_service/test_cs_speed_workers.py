"""Issue 7: batched tracking can encode with two processes (``workers=2``: a forked child encodes every other
batch). The batches are the same as with one process, so the features, and the states, are bitwise the same."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from solutions.customer_service import dst as D
from solutions.customer_service.encoder import MiniLMEncoder

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str]]:
    from tests.solutions.customer_service.conftest import sgd_train_split

    d = random.Random(4).sample(sgd_train_split().dialogues, 2)
    p = list(D.iter_user_turns(d))
    return [x[2] for x in p], [x[3] for x in p]


def _same(a: list[D.TurnFeatures], b: list[D.TurnFeatures]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.h, y.h) and np.array_equal(x.u, y.u) and np.array_equal(x.s, y.s)
        and np.array_equal(x.seg, y.seg) and x.offsets == y.offsets for x, y in zip(a, b, strict=True))


def test_two_encoder_processes_give_bitwise_the_same_features(pairs: tuple[list[str], list[str]]) -> None:
    enc = MiniLMEncoder(cache_dir=None)
    users, systems = pairs
    assert len(users) >= 8  # batch_size 2 -> at least 4 batches: the child encodes half of them
    one = D._encode_pairs(enc, users, systems, batch_size=2)
    pids: list[int] = []
    fork = D._fork_encoder

    def spy(*a: object) -> tuple[int, int]:
        r = fork(*a)  # type: ignore[arg-type]
        pids.append(r[0])
        return r

    D._fork_encoder = spy  # type: ignore[assignment]
    try:
        two = D._encode_pairs(enc, users, systems, batch_size=2, workers=2)
    finally:
        D._fork_encoder = fork  # type: ignore[assignment]
    assert len(pids) == 1 and pids[0] != os.getpid()  # a second process did encode
    assert _same(one, two)
    # with too few batches for two processes, one encodes them all (same result)
    assert _same(D._encode_pairs(enc, users[:3], systems[:3], batch_size=2, workers=2),
                 D._encode_pairs(enc, users[:3], systems[:3], batch_size=2))


def test_a_failed_child_leaves_its_batches_to_the_parent(pairs: tuple[list[str], list[str]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    enc = MiniLMEncoder(cache_dir=None)
    users, systems = pairs
    one = D._encode_pairs(enc, users, systems, batch_size=2)

    def failing(*_a: object) -> tuple[int, int]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os._exit(1)  # dies before sending anything
        os.close(w)
        return pid, r

    monkeypatch.setattr(D, "_fork_encoder", failing)
    assert _same(D._encode_pairs(enc, users, systems, batch_size=2, workers=2), one)


def test_track_sgd_with_two_encoder_processes_tracks_the_same_states(tiny_tracker_dir: object) -> None:
    from tests.solutions.customer_service.conftest import tiny_service_data

    pool, schemas = tiny_service_data()
    tk = D.DialogueStateTracker.load(tiny_tracker_dir / "dst-sgd", MiniLMEncoder(cache_dir=None))  # type: ignore[operator]
    dialogues = random.Random(9).sample(pool, 6)
    one = tk.track_sgd(dialogues, schemas, batch_size=4)
    two = tk.track_sgd(dialogues, schemas, batch_size=4, workers=2)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert any(fr["state"]["slot_values"] for d in two for t in d["turns"] if t["speaker"] == "USER"
               for fr in t["frames"])
