"""Intent discovery: cluster unlabelled customer turns into candidate intents with readable labels.

Scored like DSTC11 Track 2 task 1: Hungarian-matched clustering accuracy (each cluster mapped to at
most one gold intent) and normalised mutual information.

Method: MiniLM sentence embeddings -> KMeans (k-means++, 10 restarts, seed 13). The number of clusters
is *not* taken from the gold labels: it is the k in ``k_range`` with the best silhouette score.
Each cluster's label is its top class-TF-IDF terms (unigrams/bigrams, stop words removed), e.g.
"cancel policy" -> shown to a support team as a candidate new intent.

Data contract: ``discover(texts) -> Discovery(assignments (N,), labels [k], k, centroids (k, 384))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from solutions.customer_service.encoder import MiniLMEncoder

SEED = 13


@dataclass
class Discovery:
    assignments: np.ndarray          # (N,) cluster id per text
    labels: list[str]                # readable label per cluster
    k: int
    centroids: np.ndarray            # (k, 384)
    examples: list[list[str]]        # up to 3 texts nearest to each centroid


def choose_k(x: np.ndarray, k_range: Sequence[int]) -> int:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    best_k, best = k_range[0], -2.0
    for k in k_range:
        if k >= len(x):
            break
        km = KMeans(n_clusters=k, n_init=1, random_state=SEED).fit(x)
        s = float(silhouette_score(x, km.labels_, metric="cosine", random_state=SEED))
        if s > best:
            best_k, best = k, s
    return best_k


def cluster_labels(texts: Sequence[str], assign: np.ndarray, k: int, top: int = 3) -> list[str]:
    """c-TF-IDF: terms frequent in one cluster and rare in the others."""
    from sklearn.feature_extraction.text import CountVectorizer

    docs = [" ".join(t for t, a in zip(texts, assign, strict=True) if a == c) for c in range(k)]
    cv = CountVectorizer(ngram_range=(1, 2), stop_words="english", min_df=1)
    try:
        tf = cv.fit_transform(docs).toarray().astype(float)
    except ValueError:  # only stop words
        return [f"cluster {c}" for c in range(k)]
    tf = tf / np.maximum(tf.sum(1, keepdims=True), 1.0)
    idf = np.log(1.0 + tf.shape[0] / np.maximum((tf > 0).sum(0), 1))
    score = tf * idf
    vocab = np.array(cv.get_feature_names_out())
    out = []
    for c in range(k):
        terms: list[str] = []
        for j in np.argsort(-score[c]):
            w = str(vocab[j])
            if score[c, j] <= 0 or len(terms) >= top:
                break
            if not any(w in t or t in w for t in terms):
                terms.append(w)
        out.append(" / ".join(terms) or f"cluster {c}")
    return out


def discover(texts: Sequence[str], encoder: MiniLMEncoder, k: int | None = None,
             k_range: Sequence[int] = tuple(range(4, 41, 2))) -> Discovery:
    from sklearn.cluster import KMeans

    from core.errors import DataError

    texts = [t for t in texts]
    if len(texts) < 3:
        raise DataError("intent discovery needs at least 3 texts")
    x = encoder.encode(texts, desc="encoding turns")
    k = k or choose_k(x, [kk for kk in k_range if kk < len(texts)] or [2])
    km = KMeans(n_clusters=k, n_init=10, random_state=SEED).fit(x)
    assign = km.labels_.astype(int)
    examples = []
    for c in range(k):
        idx = np.where(assign == c)[0]
        d = ((x[idx] - km.cluster_centers_[c]) ** 2).sum(1)
        examples.append([texts[i] for i in idx[np.argsort(d)[:3]]])
    return Discovery(assign, cluster_labels(texts, assign, k), k, km.cluster_centers_, examples)


def hungarian_accuracy(gold: Sequence[str], pred: Sequence[int]) -> float:
    """Best one-to-one mapping of clusters to gold intents (scipy ``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    gl = {g: i for i, g in enumerate(sorted(set(gold)))}
    pl = {p: i for i, p in enumerate(sorted(set(pred)))}
    m = np.zeros((len(pl), len(gl)), dtype=np.int64)
    for g, p in zip(gold, pred, strict=True):
        m[pl[p], gl[g]] += 1
    r, c = linear_sum_assignment(-m)
    return float(m[r, c].sum() / max(len(gold), 1))


def discovery_metrics(gold: Sequence[str], pred: Sequence[int]) -> dict[str, float]:
    from sklearn.metrics import normalized_mutual_info_score

    return {"acc": round(hungarian_accuracy(gold, pred), 4),
            "nmi": round(float(normalized_mutual_info_score(gold, pred)), 4)}
