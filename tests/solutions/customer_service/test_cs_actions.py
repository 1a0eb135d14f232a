"""Next-action zero-shot combination (template scorer + kNN over seen contexts) on small synthetic vectors."""

from __future__ import annotations

import numpy as np
import torch

from solutions.customer_service import actions as A
from solutions.customer_service.encoder import DIM


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_knn_k1_is_the_retrieval_baseline_and_rows_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    tx, qx = _unit(rng.normal(size=(40, 2 * DIM))), _unit(rng.normal(size=(15, 2 * DIM)))
    ty = [f"a{i % 4}" for i in range(40)]
    cands = ["a0", "a1", "a2", "a3", "unseen"]
    p1 = A.knn_probs(tx, ty, qx, cands, k=1)
    assert [cands[j] for j in p1.argmax(1)] == A.retrieval_predict(tx, ty, qx)
    p10 = A.knn_probs(tx, ty, qx, cands, k=10)
    assert np.allclose(p10.sum(1), 1.0, atol=1e-5)
    assert (p10[:, cands.index("unseen")] == 0).all()  # no neighbour carries an action of an unseen domain


class _FixedScorer(A.ActionScorer):
    """Logits 0 for "hello" and 2 for "ride_ask_destination" (the sorted candidates), whatever the input."""

    def forward(self, ctx: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 2.0])[None].expand(ctx.shape[0], 2)


def test_zero_shot_mix_weights() -> None:
    rng = np.random.default_rng(1)
    tx, qx = _unit(rng.normal(size=(30, 2 * DIM))), _unit(rng.normal(size=(8, 2 * DIM)))
    ty = ["hello"] * 30  # every neighbour votes "hello"
    vecs = {a: _unit(rng.normal(size=(1, DIM)))[0] for a in ("hello", "ride_ask_destination")}
    cands = sorted(vecs)
    scorer = _FixedScorer().eval()
    p = A.scorer_probs(scorer, qx, cands, vecs)
    assert np.allclose(p.sum(1), 1.0, atol=1e-5) and (p[:, 1] > 0.85).all()
    assert A.zero_shot_predict(scorer, qx, cands, vecs, tx, ty, weight=0.0) == A.scorer_predict(scorer, qx, cands, vecs)
    # mix (1 - w) * (0.12, 0.88) + w * (1, 0): the unseen action wins below w = 0.43, the vote above
    assert A.zero_shot_predict(scorer, qx, cands, vecs, tx, ty, weight=0.3) == ["ride_ask_destination"] * 8
    assert A.zero_shot_predict(scorer, qx, cands, vecs, tx, ty, weight=0.6) == ["hello"] * 8
