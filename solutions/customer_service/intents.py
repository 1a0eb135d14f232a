"""Single-message intent classifier with out-of-scope abstention.

Features: frozen MiniLM sentence embedding (384-d, scaled) next to word and character n-gram TF-IDF
(the lexical cues of banking queries: "top up", "PIN", "card arrival"), one multinomial logistic
regression on top. Out of scope = abstain when the top probability is below a threshold chosen on
training data only: when the dataset has labelled OOS training texts (CLINC150 ``oos_train``), the
lowest threshold that rejects ``OOS_RECALL_GOAL`` of them.

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
    def __init__(self, encoder: MiniLMEncoder, c: float = 10.0, threshold: float = 0.0) -> None:
        self.encoder = encoder
        self.c = c
        self.threshold = threshold
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
            self.threshold = self._calibrate(texts, labels, list(oos_texts))
        return self

    def _calibrate(self, texts: list[str], labels: list[str], oos_texts: list[str]) -> float:
        """Threshold from the OOS training texts (never trained on): the lowest threshold whose OOS
        recall on them reaches ``OOS_RECALL_GOAL``; every higher threshold only rejects more in-scope
        texts. (Maximising held-out in-scope accuracy + OOS recall instead pushed the threshold to 0.9
        and cost 11 points of in-scope accuracy on CLINC150.)"""
        conf_oos = self.clf.predict_proba(self._features(oos_texts)).max(1)
        for t in np.linspace(0.05, 0.9, 86):
            if float((conf_oos < t).mean()) >= OOS_RECALL_GOAL:
                return float(t)
        return 0.9

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.clf.predict_proba(self._features(list(texts)))

    def predict(self, texts: Sequence[str]) -> list[str]:
        p = self.predict_proba(texts)
        top = p.argmax(1)
        return [OOS if p[i, top[i]] < self.threshold else self.classes[top[i]] for i in range(len(top))]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "classifier.pkl").open("wb") as f:
            pickle.dump({"vectorizers": self.vectorizers, "clf": self.clf}, f)
        (folder / "config.json").write_text(json.dumps({"c": self.c, "threshold": self.threshold,
                                                        "classes": self.classes}))

    @classmethod
    def load(cls, folder: Path, encoder: MiniLMEncoder) -> IntentClassifier:
        from core.errors import ModelNotReady

        if not (folder / "classifier.pkl").exists():
            raise ModelNotReady(f"no intent classifier in {folder}; run `verticals customer-service train --task intents`")
        cfg = json.loads((folder / "config.json").read_text())
        obj = cls(encoder, c=cfg["c"], threshold=cfg["threshold"])
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
