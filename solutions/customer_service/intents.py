"""Single-message intent classifier with out-of-scope abstention.

Features: frozen MiniLM sentence embedding (384-d, scaled) next to word and character n-gram TF-IDF
(the lexical cues of banking queries: "top up", "PIN", "card arrival"), one multinomial logistic
regression on top. Out of scope = abstain when the top class *logit* (MaxLogit) is below a threshold
chosen on training data only: when the dataset has labelled OOS training texts (CLINC150 ``oos_train``),
the lowest threshold that rejects ``OOS_RECALL_GOAL`` of them. (The top probability, used before, rejected
twice as many in-scope texts at the same OOS rejection on a held-out part of CLINC150 train: README.)
Classifiers stored before keep their top-probability score (``score`` in the stored config).

Data contract: ``fit(texts, labels)``; ``predict(texts) -> list[str]`` with ``"oos"`` for abstentions;
``predict_proba(texts) -> (N, C)``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from solutions.customer_service.data import OOS
from solutions.customer_service.encoder import MiniLMEncoder

EMB_SCALE = 3.0


# OOS recall wanted on the OOS training texts: the product target (>= 0.60 OOS recall), no more, since
# every extra rejected OOS text costs in-scope accuracy. (0.7 gave in-scope 0.940 / OOS 0.79 on dev.)
OOS_RECALL_GOAL = 0.6


class IntentClassifier:
    def __init__(self, encoder: MiniLMEncoder, c: float = 10.0, threshold: float = 0.0,
                 score: str = "maxlogit", abstain: bool = False) -> None:
        if score not in ("maxlogit", "maxprob"):
            raise ValueError(f"unknown out-of-scope score {score!r}: maxlogit or maxprob")
        self.encoder = encoder
        self.c = c
        self.threshold = threshold
        self.score = score
        self.abstain = abstain  # True once a threshold was chosen from OOS training texts
        self.vectorizers: list[Any] = []
        self.clf: Any = None
        self.classes: list[str] = []

    def _features(self, texts: Sequence[str], desc: str = "") -> Any:
        from scipy.sparse import csr_matrix, hstack

        emb = self.encoder.encode(list(texts), desc=desc) * EMB_SCALE
        return hstack([csr_matrix(emb)] + [v.transform(texts) for v in self.vectorizers]).tocsr()

    def fit(self, texts: Sequence[str], labels: Sequence[str], oos_texts: Sequence[str] = ()) -> IntentClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        texts, labels = list(texts), list(labels)
        self.vectorizers = [
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True).fit(texts),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2).fit(texts),
        ]
        x = self._features(texts, desc="encoding intents")
        self.clf = LogisticRegression(C=self.c, max_iter=300)
        self.clf.fit(x, labels)
        self.classes = [str(c) for c in self.clf.classes_]
        if oos_texts:
            self.threshold = self._calibrate(list(oos_texts))
            self.abstain = True
        return self

    def _calibrate(self, oos_texts: list[str]) -> float:
        """Threshold from the OOS training texts (never trained on): the lowest threshold whose OOS
        recall on them reaches ``OOS_RECALL_GOAL``; every higher threshold only rejects more in-scope
        texts. (Maximising held-out in-scope accuracy + OOS recall instead pushed the threshold up and
        cost 11 points of in-scope accuracy on CLINC150.)"""
        conf = np.sort(self.oos_score(oos_texts))
        k = int(np.ceil(OOS_RECALL_GOAL * len(conf)))  # reject the k lowest-scoring OOS texts
        return float(np.nextafter(conf[k - 1], np.inf))

    def _scores(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(top class index, out-of-scope score: top logit or top probability) per text."""
        x = self._features(list(texts))
        z = self.clf.decision_function(x) if self.score == "maxlogit" else self.clf.predict_proba(x)
        return z.argmax(1), z.max(1)

    def oos_score(self, texts: Sequence[str]) -> np.ndarray:
        """Confidence that a text is in scope (lower = abstain first)."""
        return self._scores(texts)[1]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.clf.predict_proba(self._features(list(texts)))

    def predict(self, texts: Sequence[str]) -> list[str]:
        top, conf = self._scores(texts)
        return [OOS if self.abstain and conf[i] < self.threshold else self.classes[top[i]] for i in range(len(top))]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "classifier.pkl").open("wb") as f:
            pickle.dump({"vectorizers": self.vectorizers, "clf": self.clf}, f)
        (folder / "config.json").write_text(json.dumps({"c": self.c, "threshold": self.threshold, "score": self.score,
                                                        "abstain": self.abstain, "classes": self.classes}))

    @classmethod
    def load(cls, folder: Path, encoder: MiniLMEncoder) -> IntentClassifier:
        from core.errors import ModelNotReady

        if not (folder / "classifier.pkl").exists():
            raise ModelNotReady(f"no intent classifier in {folder}; run `verticals customer-service train --task intents`")
        cfg = json.loads((folder / "config.json").read_text())
        # stored before MaxLogit: top-probability score, abstaining whenever a threshold was set
        obj = cls(encoder, c=cfg["c"], threshold=cfg["threshold"], score=cfg.get("score", "maxprob"),
                  abstain=cfg.get("abstain", cfg["threshold"] > 0))
        with (folder / "classifier.pkl").open("rb") as f:
            blob = pickle.load(f)  # noqa: S301 - our own model file under VERTICALS_HOME
        obj.vectorizers, obj.clf, obj.classes = blob["vectorizers"], blob["clf"], cfg["classes"]
        return obj


def intent_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float | int | None]:
    """``accuracy`` over in-scope texts (CLINC "in-scope accuracy"), ``oos_recall`` over OOS texts
    (null when the split has none), plus overall accuracy."""
    g, p = np.array(gold), np.array(pred)
    ins, oos = g != OOS, g == OOS
    return {
        "accuracy": round(float((g[ins] == p[ins]).mean()), 4) if ins.any() else None,
        "oos_recall": round(float((p[oos] == OOS).mean()), 4) if oos.any() else None,
        "oos_precision": round(float((g[p == OOS] == OOS).mean()), 4) if (p == OOS).any() and oos.any() else None,
        "overall_accuracy": round(float((g == p).mean()), 4),
        "n": int(len(g)),
        "n_oos": int(oos.sum()),
    }
