"""Out-of-scope threshold of the intent classifier: chosen from the OOS *training* texts only, as the
lowest threshold on the top logit that rejects ``OOS_RECALL_GOAL`` of them (a stub encoder keeps this fast)."""

from __future__ import annotations

import hashlib

import numpy as np

from solutions.customer_service.intents import OOS_RECALL_GOAL, IntentClassifier


class StubEncoder:
    """Deterministic pseudo-embeddings per text (no model load)."""

    def encode(self, texts, desc: str = "", show_progress: bool = False) -> np.ndarray:  # noqa: ANN001
        out = []
        for t in texts:
            rng = np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=384)
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32).reshape(len(texts), 384)


INTENTS = {
    "balance": ["what is my balance", "how much money do i have", "show my account balance",
                "balance on checking please", "tell me my savings balance", "check my balance now"],
    "transfer": ["send money to my mom", "transfer 50 dollars to savings", "move cash to checking",
                 "wire funds to john", "make a transfer to my brother", "transfer money please"],
    "card_lost": ["i lost my card", "my card was stolen", "block my lost card", "card is missing",
                  "report a stolen card", "i cannot find my debit card"],
}
OOS = ["what is the weather in paris", "play some jazz music", "tell me a joke", "who won the game",
       "how tall is mount everest", "recommend a movie", "what time is it in tokyo", "book a flight",
       "translate hello to french", "set an alarm for 7"]


def _fit(oos: list[str]) -> IntentClassifier:
    texts = [t for ts in INTENTS.values() for t in ts]
    labels = [k for k, ts in INTENTS.items() for _ in ts]
    return IntentClassifier(StubEncoder()).fit(texts, labels, oos_texts=oos)  # type: ignore[arg-type]


def test_threshold_is_the_lowest_that_reaches_the_oos_recall_goal() -> None:
    clf = _fit(OOS)
    assert clf.score == "maxlogit" and clf.abstain
    conf = clf.oos_score(OOS)
    assert np.allclose(conf, clf.clf.decision_function(clf._features(OOS)).max(1))
    assert float((conf < clf.threshold).mean()) >= OOS_RECALL_GOAL
    # the lowest such threshold: any lower one misses the goal
    assert float((conf < np.nextafter(clf.threshold, -np.inf)).mean()) < OOS_RECALL_GOAL
    pred = clf.predict(OOS)
    assert sum(p == "oos" for p in pred) >= OOS_RECALL_GOAL * len(OOS)


def test_threshold_survives_save_and_load(tmp_path) -> None:  # noqa: ANN001
    clf = _fit(OOS)
    clf.save(tmp_path)
    back = IntentClassifier.load(tmp_path, StubEncoder())  # type: ignore[arg-type]
    assert (back.score, back.abstain, back.threshold) == (clf.score, clf.abstain, clf.threshold)
    assert back.predict(OOS + INTENTS["balance"]) == clf.predict(OOS + INTENTS["balance"])


def test_no_oos_texts_means_no_abstention() -> None:
    clf = _fit([])
    assert clf.threshold == 0.0 and not clf.abstain
    assert "oos" not in clf.predict(["what is my balance", "blah blah unrelated"])
