"""Late fusion of the CNN heads with two small independent models, and study-level pooling of the region.

* :func:`image_stats`: intensity statistics of a key image (32-bin histogram, saturated/black pixels,
  foreground percentiles, body aspect ratio, gradient and background texture). CT is windowed from
  absolute HU (air black, bone saturated white), MR is auto-windowed with noisy background: these
  statistics separate the two differently from the CNN. A gradient-boosted tree model (scikit-learn
  ``HistGradientBoostingClassifier``) predicts the modality from them plus the plane.
* :func:`native_stats`: the same kind of statistics on the full-resolution view (longest side 256, no
  padding: :func:`data.load_native_array`): image size and aspect, black/saturated fractions, fine-scale
  noise in body and background, which the 128 px canvas blurs away. When the caller has that view, a
  second tree model reads both sets (``stats_native``); otherwise the 128 px model decides.
* :func:`clinical_text`: what the request for the study carries: the clinical history (and exam),
  patient sex, age decade and the acquisition plane. TF-IDF (character 2-5 grams within words) + logistic
  regression predict the modality and the body region from it; a second logistic regression reads the
  request's MiniLM sentence embedding (the reporter's own text encoder) for the body region: it
  generalises across wordings ("low back pain", "lumbar radiculopathy") where TF-IDF needs the same
  words; a third reads :func:`anatomy_features`, counts of body-part words per region (``ANATOMY_LEXICON``).

Fused scores are ``log softmax(CNN logits) + w * log p(model)`` per class, with weights chosen on
out-of-fold scores of case-disjoint folds of TRAIN (README "Model"). The body region is a property of the study, so the
region scores of all images of one study (MedPix: one case) are averaged before the decision.

Named input: (N, S, S) images in [0, 1], one request text per image and (region) its (N, 384) MiniLM
embedding. Named output: per-class
log-probabilities (N, C). Saved as ``fusion.pkl`` beside the reporter (our own file; pickle).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_softmax

from solutions.medical_imaging.data import PLANES

FUSION = "fusion.pkl"
# What a request says about the body, one pattern per region (REGIONS order): words of the history / exam
# that point at a body part. Counted per request (log1p) and read by a small logistic regression, so
# "low back pain" and "knee swelling" reach Spine and Muscles with few training examples.
ANATOMY_LEXICON: tuple[str, ...] = (
    r"\b(?:head|brain|skull|crani|cerebr|seizur|headache|mental status|confus|letharg|vision|visual|diplopia|"
    r"eyes?\b|orbit|proptosis|facial|face\b|ears?\b|hearing|tinnitus|sinus|nasal|stroke|aphasia|dizz|vertigo|"
    r"memory|dementia|neck mass|thyroid|jaw|tongue|throat|hydroceph|intracranial)",
    r"\b(?:chest|cough|dyspnea|short(?:ness)? of breath|breath|lungs?\b|pulmonar|hemoptysis|pneumon|heart|"
    r"cardi|aort|mediastin|breast|pleur|sob\b|wheez)",
    r"\b(?:abdom|belly|nausea|vomit|jaundice|liver|hepat|bowel|stool|diarrh|constipat|gastr|epigastr|pancrea|"
    r"splen|rlq|ruq|llq|luq|append|melena|dysphagia|biliar|gallbladder|cholecyst)",
    r"\b(?:back\b|back pain|spin|lumbar|cervical|vertebr|radicul|sciatica|paresthes|numb|tingl|weakness|gait|"
    r"myelopath|knee|shoulder|hip|ankle|foot|feet|wrist|hand|elbow|arm\b|arms\b|legs?\b|thigh|extremit|joint|"
    r"bone|fractur|soft tissue|muscle|limp|trauma|fall\b)",
    r"\b(?:pelvi|urin|hematuria|kidney|renal|flank|bladder|prostat|testic|scrot|vagin|uter|ovar|adnex|pregnan|"
    r"menstru|menorrh|groin|penile|penis|infertil|gravida)",
)
_LEXICON = tuple(re.compile(p) for p in ANATOMY_LEXICON)
# Fusion weights, chosen on out-of-fold scores of TRAIN (case-disjoint folds: a CNN and side models per
# fold; never on dev); see README "Model". W_MOD_STATS (no full-resolution view) is from the older 20 % holdout.
W_MOD_STATS, W_MOD_NATIVE, W_MOD_TEXT, W_REG_TEXT, W_REG_EMB, W_REG_LEX = 0.5, 0.5, 1.0, 1.0, 1.0, 0.5
TEXT_MOD_ANALYZER, TEXT_REG_ANALYZER = "char_wb", "char_wb"  # the request-text TF-IDF models (see _text_model)
LEX_C = 1.0  # inverse regularisation of the anatomy-lexicon region model
# Share of a modality score replaced by its study mean (images of one study are mostly one modality,
# 95 % in MedPix TRAIN); the region is one per study, so its scores are fully averaged.
MOD_POOL = 0.5
EMB_C = 2.0  # inverse regularisation of the embedding model (5-fold case-grouped CV on TRAIN)
EPS = 1e-6


def image_stats(img: np.ndarray) -> np.ndarray:
    """(S, S) float in [0, 1] (the padded model-input canvas) -> (244,) float32 intensity/texture statistics."""
    if img.ndim != 2:
        raise ValueError(f"image_stats expects one 2-D image, got shape {img.shape}")
    a = np.round(np.clip(img, 0, 1) * 255)
    hist = np.bincount(a.astype(np.uint8).ravel(), minlength=256).astype(np.float32) / a.size
    fg = a[a > 10]
    q = np.percentile(fg, [5, 25, 50, 75, 95]) / 255 if fg.size else np.zeros(5)
    rows, cols = np.flatnonzero(a.max(1) > 0), np.flatnonzero(a.max(0) > 0)
    aspect = (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1) if rows.size else 1.0
    gx, gy = np.abs(np.diff(a, axis=1)), np.abs(np.diff(a, axis=0))
    c = a[1:-1, 1:-1]
    lap = np.abs(4 * c - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])
    bg = (c < 30) & (c > 0)
    extra = [aspect, (a == 0).mean(), (a >= 250).mean(), (a < 10).mean(), gx.mean() / 255, gy.mean() / 255,
             np.median(lap) / 255, lap[bg].mean() / 255 if bg.any() else 0.0, fg.std() / 255 if fg.size else 0.0,
             len(np.unique(a)) / 256]
    return np.concatenate([hist.reshape(32, 8).sum(1), np.log(hist[[0, 255]] + 1e-4), q, extra,
                           _texture(np.clip(img, 0, 1).astype(np.float32))]).astype(np.float32)


def native_stats(img: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1], the full-resolution view (longest side 256, no padding) -> (94,) float32:
    size/aspect, black/saturated fractions, grey-level count, fine-scale residual (noise) level in the
    body and in the dim background, low-intensity histogram, intensity x residual and gradient histograms,
    border intensities."""
    from scipy.ndimage import uniform_filter

    if img.ndim != 2 or min(img.shape) < 3:
        raise ValueError(f"native_stats expects one 2-D image of at least 3x3 pixels, got shape {img.shape}")
    a = np.round(np.clip(img, 0, 1) * 255).astype(np.float32) / 255
    h, w = a.shape
    r = np.abs(a - uniform_filter(a, 3))
    fg, bgm = a > 0.04, (a > 0) & (a < 0.06)
    f = [w / 256, h / 256, w / h, (a == 0).mean(), (a >= 254 / 255).mean(), len(np.unique(a)) / 256,
         r[fg].mean() if fg.any() else 0.0, np.median(r[fg]) if fg.any() else 0.0,
         r[bgm].mean() if bgm.any() else 0.0, bgm.mean(), np.percentile(r[fg], 90) if fg.any() else 0.0]
    jh = np.histogram2d(a[fg], np.clip(r[fg], 0, 0.2), bins=(8, 6), range=((0, 1), (0, 0.2)))[0].ravel()
    jh /= max(jh.sum(), 1)
    g = np.hypot(np.diff(a, axis=1)[:-1], np.diff(a, axis=0)[:, :-1])
    gh = np.histogram(g[fg[:-1, :-1]], bins=12, range=(0, 0.6))[0].astype(np.float32)
    gh /= max(gh.sum(), 1)
    border = np.concatenate([a[:4].ravel(), a[-4:].ravel(), a[:, :4].ravel(), a[:, -4:].ravel()])
    f += [border.mean(), (border > 0.5).mean(), (border == 0).mean()]
    low = np.histogram(a, bins=20, range=(0, 0.2))[0] / a.size
    return np.concatenate([f, low, jh, gh]).astype(np.float32)


def _texture(a: np.ndarray) -> np.ndarray:
    """(195,) texture statistics: gradient-magnitude histogram, fine-scale residual (noise) level in the body
    and in dim regions, joint intensity x residual histogram, and a 12x12 thumbnail of the layout."""
    from PIL import Image
    from scipy.ndimage import uniform_filter

    g = np.hypot(np.diff(a, axis=1)[:-1], np.diff(a, axis=0)[:, :-1])
    gh = np.histogram(g[a[:-1, :-1] > 0.04], bins=16, range=(0, 0.5))[0].astype(np.float32)
    gh /= max(gh.sum(), 1)
    r = np.abs(a - uniform_filter(a, 3))
    fg, dim = a > 0.04, (a > 0.01) & (a < 0.15)
    noise = [r[fg].mean() if fg.any() else 0.0, r[dim].mean() if dim.any() else 0.0,
             np.median(r[fg]) if fg.any() else 0.0]
    jh = np.histogram2d(a[fg], np.clip(r[fg], 0, 0.2), bins=(8, 4), range=((0, 1), (0, 0.2)))[0].ravel()
    jh /= max(jh.sum(), 1)
    thumb = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((12, 12), Image.Resampling.BILINEAR), np.float32)
    return np.concatenate([gh, noise, jh, thumb.ravel() / 255])


def clinical_text(history: str, sex: str = "", age: str = "", plane: str = "") -> str:
    """The request as one string for the text model: history/exam words plus sex, age-decade, plane tokens."""
    age_digits = "".join(ch for ch in str(age) if ch.isdigit())
    decade = str(int(age_digits) // 10) if age_digits else "x"
    sx = (sex or "").strip().lower()[:1]  # MedPix "female"/"male", DICOM PatientSex "F"/"M"/"O"
    return f"{history} sex_{sx if sx in ('f', 'm') else 'x'} age_{decade} plane_{plane or 'other'}"


def anatomy_features(texts: Sequence[str]) -> np.ndarray:
    """(N, len(ANATOMY_LEXICON)) log1p counts of each region's body-part words in each request text."""
    return np.log1p(np.array([[len(p.findall(t.lower())) for p in _LEXICON] for t in texts], dtype=np.float64)
                    .reshape(len(texts), len(_LEXICON)))


def _stats_features(images: np.ndarray, planes: Sequence[str]) -> np.ndarray:
    """What the modality tree model reads: image_stats of each image plus the plane one-hot."""
    return np.hstack([np.stack([image_stats(im) for im in images]), _plane_onehot(planes)])


def _native_features(full_images: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([native_stats(np.asarray(im, dtype=np.float32)) for im in full_images])


def _plane_onehot(planes: Sequence[str]) -> np.ndarray:
    return np.eye(len(PLANES), dtype=np.float32)[[PLANES.index(p) if p in PLANES else PLANES.index("other")
                                                  for p in planes]]


def pool_by_group(scores: np.ndarray, groups: Sequence[Any] | None, share: float = 1.0) -> np.ndarray:
    """Replace ``share`` of each row of (N, C) scores by the mean over rows sharing its group id (one study);
    ``None`` or empty group ids: unchanged."""
    if groups is None:
        return scores
    out = scores.copy()
    g = np.asarray([str(x) if x is not None else "" for x in groups])
    for key in np.unique(g):
        if key == "":
            continue
        m = g == key
        out[m] = (1 - share) * scores[m] + share * scores[m].mean(axis=0)
    return out


@dataclass
class Fusion:
    """The two side models and their weights (classes in MODALITIES / REGIONS order)."""

    stats_modality: Any  # HistGradientBoostingClassifier on image_stats + plane
    text_modality: Any  # TF-IDF + LogisticRegression on clinical_text
    text_region: Any
    emb_region: Any = None  # LogisticRegression on the request's MiniLM embedding (None: fitted without it)
    stats_native: Any = None  # tree model on image_stats + native_stats + plane (None: fitted without it)
    n_classes: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=lambda: {
        "mod_stats": W_MOD_STATS, "mod_native": W_MOD_NATIVE, "mod_text": W_MOD_TEXT, "reg_text": W_REG_TEXT,
        "reg_emb": W_REG_EMB, "reg_lex": W_REG_LEX})
    lex_region: Any = None  # LogisticRegression on anatomy_features of the request (None: fitted without it)

    @classmethod
    def fit(cls, images: np.ndarray, texts: Sequence[str], planes: Sequence[str], modality: np.ndarray,
            region: np.ndarray, n_modalities: int, n_regions: int, seed: int = 0,
            text_emb: np.ndarray | None = None, full_images: Sequence[np.ndarray] | None = None) -> Fusion:
        """``text_emb``: (N, 384) MiniLM embeddings of ``texts``; None fits no embedding model.
        ``full_images``: the full-resolution view of each image (:func:`native_stats`); None fits no
        ``stats_native`` model."""
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression

        if len(images) != len(texts) or len(images) != len(modality) or len(images) != len(region):
            raise ValueError("fusion: images, texts and labels differ in length")
        if text_emb is not None and len(text_emb) != len(texts):
            raise ValueError("fusion: texts and their embeddings differ in length")
        if len(np.unique(modality)) < 2 or len(np.unique(region)) < 2:
            raise ValueError("fusion: the training labels need at least two modality and two region classes")
        if full_images is not None and len(full_images) != len(images):
            raise ValueError("fusion: images and their full-resolution views differ in length")
        X = _stats_features(images, planes)

        def tree() -> Any:
            return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=seed)

        stats = tree().fit(X, modality)
        native = None if full_images is None else tree().fit(np.hstack([X, _native_features(full_images)]), modality)
        emb = None if text_emb is None else LogisticRegression(C=EMB_C, max_iter=3000).fit(text_emb, region)
        lex = LogisticRegression(C=LEX_C, max_iter=3000).fit(anatomy_features(texts), region)
        return cls(stats, _text_model(TEXT_MOD_ANALYZER).fit(list(texts), modality),
                   _text_model(TEXT_REG_ANALYZER).fit(list(texts), region), emb, native,
                   n_classes={"modality": n_modalities, "region": n_regions}, lex_region=lex)

    def modality_scores(self, cnn_logits: np.ndarray, images: np.ndarray, texts: Sequence[str],
                        planes: Sequence[str], full_images: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(N, n_modalities) fused log-scores. ``full_images``: the full-resolution views (longest side
        256, no padding); with them and a ``stats_native`` model, that model replaces the 128 px one."""
        X = _stats_features(images, planes)
        w = self.weights
        k = cnn_logits.shape[1]
        native = getattr(self, "stats_native", None)
        if full_images is not None and native is not None:
            if len(full_images) != len(images):
                raise ValueError("fusion: images and their full-resolution views differ in length")
            p_stats = _proba(native, np.hstack([X, _native_features(full_images)]), k)
            w_stats = w.get("mod_native", W_MOD_NATIVE)
        else:
            p_stats, w_stats = _proba(self.stats_modality, X, k), w["mod_stats"]
        return (log_softmax(cnn_logits, axis=1) + w_stats * np.log(p_stats + EPS)
                + w["mod_text"] * np.log(_proba(self.text_modality, list(texts), k) + EPS))

    def region_scores(self, cnn_logits: np.ndarray, texts: Sequence[str],
                      text_emb: np.ndarray | None = None) -> np.ndarray:
        """(N, n_regions) fused log-scores (before pooling over the study). ``text_emb``: the texts' MiniLM
        embeddings, needed when the fusion has an embedding model with a non-zero weight."""
        k = cnn_logits.shape[1]
        out = log_softmax(cnn_logits, axis=1) + self.weights["reg_text"] * np.log(
            _proba(self.text_region, list(texts), k) + EPS)
        w_emb, emb_model = self.weights.get("reg_emb", 0.0), getattr(self, "emb_region", None)
        if w_emb and emb_model is not None:
            if text_emb is None or len(text_emb) != len(out):
                raise ValueError("fusion: region_scores needs one MiniLM embedding per request text")
            out = out + w_emb * np.log(_proba(emb_model, text_emb, k) + EPS)
        w_lex, lex_model = self.weights.get("reg_lex", 0.0), getattr(self, "lex_region", None)
        if w_lex and lex_model is not None:
            out = out + w_lex * np.log(_proba(lex_model, anatomy_features(texts), k) + EPS)
        return out

    def save(self, folder: Path) -> None:
        with (Path(folder) / FUSION).open("wb") as f:
            pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def load(folder: Path) -> Fusion | None:
        p = Path(folder) / FUSION
        if not p.exists():
            return None  # a reporter trained before fusion existed: CNN heads alone
        with p.open("rb") as f:
            return pickle.load(f)  # noqa: S301 - our own model file under VERTICALS_HOME


def _proba(model: Any, X: Any, k: int) -> np.ndarray:
    """(N, k) class probabilities in label order; classes absent from training get 0."""
    p = model.predict_proba(X)
    out = np.zeros((p.shape[0], k), dtype=np.float64)
    out[:, np.asarray(model.classes_, dtype=int)] = p
    return out


def _text_model(analyzer: str = "word") -> Any:
    """TF-IDF + logistic regression on the request text: word 1-2 grams, or (``"char_wb"``) character
    2-5 grams within words, which also match inflections and fused words ("lumbosacral", "headaches")."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    ngrams = (2, 5) if analyzer == "char_wb" else (1, 2)
    return make_pipeline(TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, min_df=2, sublinear_tf=True),
                         LogisticRegression(C=10.0, max_iter=3000))
