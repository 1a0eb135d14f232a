"""Case-disjoint out-of-fold (OOF) harness on the TRAIN split: how modality/region choices are made.

TRAIN is split into ``k`` case-disjoint folds (:func:`case_folds`). For each fold, :func:`run_fold` trains the
image encoder exactly as ``train`` does (:func:`pipeline.train_encoder`, the ``train`` defaults) and the fusion
side models (:func:`pipeline.fit_fusion`) on the other folds, and stores for the held-out images the CNN head
logits (with the mirror TTA the shipped model uses), the trunk features and every side model's class
probabilities, plus the fold encoder's weights (so inference-only variants can be scored without retraining).
:func:`collect` joins the folds (one row per TRAIN image, in :func:`data.load_medpix` order) and :func:`score`
applies the shipped fusion formula (``fusion.Fusion.modality_scores`` / ``region_scores`` + study pooling) with
any weights. Nothing here reads the dev or test split.

Named input: a MedPix-layout folder. Named output: ``<out>/fold<i>.npz`` (+ ``fold<i>.safetensors``) and a
shared MiniLM cache ``<out>/text_cache.npz``.

CLI: ``verticals medical-imaging oof --data DIR --out DIR [--fold I ...]`` then ``... oof --out DIR --report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import log_softmax

from solutions.medical_imaging import fusion as fu
from solutions.medical_imaging.data import (
    MODALITIES,
    REGIONS,
    load_image_array,
    load_medpix,
    load_native_array,
)

# Side-model members stored per fold (their Fusion weight key) -> the task they score.
MEMBERS = {"mod_native": "modality", "mod_text": "modality", "reg_text": "region", "reg_emb": "region",
           "reg_lex": "region"}


def case_folds(case_ids: Sequence[str], k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per image: the distinct cases are shuffled with ``seed`` and dealt round-robin,
    so every image of one case lands in one fold."""
    if k < 2:
        raise ValueError(f"case_folds: k must be >= 2, got {k}")
    cases = sorted(set(case_ids))
    if len(cases) < k:
        raise ValueError(f"case_folds: {len(cases)} cases cannot fill {k} folds")
    order = np.random.default_rng(seed).permutation(len(cases))
    fold_of = {cases[j]: i % k for i, j in enumerate(order)}
    return np.array([fold_of[c] for c in case_ids])


def member_probs(fusion: fu.Fusion, images: np.ndarray, requests: Sequence[str], planes: Sequence[str],
                 text_emb: np.ndarray, full_images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Each side model's class probabilities (N, C) for these images, as :class:`fusion.Fusion` reads them."""
    X = fu._stats_features(images, planes)
    km, kr = len(MODALITIES), len(REGIONS)
    return {
        "mod_native": fu._proba(fusion.stats_native, np.hstack([X, fu._native_features(full_images)]), km),
        "mod_text": fu._proba(fusion.text_modality, list(requests), km),
        "reg_text": fu._proba(fusion.text_region, list(requests), kr),
        "reg_emb": fu._proba(fusion.emb_region, text_emb, kr),
        "reg_lex": fu._proba(fusion.lex_region, fu.anatomy_features(list(requests)), kr),
    }


def prepare_cache(data_dir: str | Path, out_dir: str | Path) -> int:
    """Embed every TRAIN history, caption and request text once into ``<out>/text_cache.npz`` (so folds run in
    parallel processes do not each run MiniLM). Returns the number of cached texts."""
    from solutions.medical_imaging import pipeline as pl

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    samples = load_medpix(data_dir, "train")
    emb = pl.CachedEmbedder(Path(out_dir) / "text_cache.npz")
    emb([s.history for s in samples] + [s.caption for s in samples] + [pl.request_text(s) for s in samples])
    emb.save()
    return len(emb.cache)


def run_fold(data_dir: str | Path, out_dir: str | Path, fold: int, k: int = 5, seed: int = 0,
             epochs: int | None = None, log: Callable[[str], None] = lambda m: None) -> Path:
    """Train the encoder + side models on the other folds; store the held-out fold's outputs. Returns the npz."""
    import json

    from safetensors.torch import save_file

    from solutions.medical_imaging import pipeline as pl
    from solutions.medical_imaging.reporter import ReporterConfig

    pl.set_threads(None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    samples = load_medpix(data_dir, "train")
    folds = case_folds([s.case_id for s in samples], k, seed)
    tr = [s for s, f in zip(samples, folds, strict=True) if f != fold]
    te = [s for s, f in zip(samples, folds, strict=True) if f == fold]
    cfg = ReporterConfig(categories=pl.finding_categories(tr), image_size=pl.IMAGE_SIZE, history_dropout=pl.HISTORY_DROPOUT)
    emb = pl.CachedEmbedder(out / "text_cache.npz")
    A, B = pl._arrays(tr, cfg, emb), pl._arrays(te, cfg, emb)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc, _ = pl.train_encoder(cfg, A, pl.ENC_EPOCHS if epochs is None else epochs, gen)
    t_cnn = time.time() - t0
    o = pl._encode_all(enc, B.images, B.history, tta=True)
    o_nohist = pl._encode_all(enc, B.images, np.zeros_like(B.history), tta=True)
    fusion = pl.fit_fusion(tr, A.images, emb, seed)
    req = [pl.request_text(s) for s in te]
    probs = member_probs(fusion, B.images, req, [s.plane for s in te], emb(req),
                         [load_native_array(s.image_path) for s in te])
    np.savez_compressed(
        out / f"fold{fold}.npz", image_id=np.array([s.image_id for s in te]), fold=np.full(len(te), fold),
        cnn_modality=o["modality"], cnn_region=o["region"], cnn_region_nohist=o_nohist["region"],
        cnn_plane=o["plane"], feature=o["feature"], embedding=o["embedding"],
        **{f"p_{k_}": v for k_, v in probs.items()})
    save_file({k_: v.contiguous() for k_, v in enc.state_dict().items()}, str(out / f"fold{fold}.safetensors"))
    (out / f"fold{fold}.json").write_text(json.dumps(cfg.to_dict()))
    log(f"fold {fold}: {len(tr)} train / {len(te)} held-out images, CNN {t_cnn:.0f}s, total {time.time() - t0:.0f}s")
    return out / f"fold{fold}.npz"


def collect(data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """All fold files joined, one row per TRAIN image in load order; labels and case ids added."""
    samples = load_medpix(data_dir, "train")
    parts = [np.load(p) for p in sorted(Path(out_dir).glob("fold*.npz"))]
    if not parts:
        raise FileNotFoundError(f"no fold*.npz in {out_dir}")
    rows = {str(i): (j, r) for j, z in enumerate(parts) for r, i in enumerate(z["image_id"])}
    keep = [s for s in samples if s.image_id in rows]
    out: dict[str, Any] = {}
    for key in parts[0].files:
        out[key] = np.stack([parts[rows[s.image_id][0]][key][rows[s.image_id][1]] for s in keep])
    out["case_id"] = np.array([s.case_id for s in keep])
    out["modality"] = np.array([MODALITIES.index(s.modality) for s in keep])
    out["region"] = np.array([REGIONS.index(s.region) for s in keep])
    out["plane"] = np.array([s.plane for s in keep])
    out["samples"] = keep
    return out


def fused_scores(d: dict[str, Any], weights: dict[str, float] | None = None, cnn_weight: float = 1.0,
                 region_logits: np.ndarray | None = None, extra_region: dict[str, tuple[float, np.ndarray]] | None = None,
                 pool: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(modality, region) log-scores by the shipped formula; ``weights`` default to the shipped ones.
    ``region_logits``: CNN region logits to use instead of the stored ones; ``extra_region``: further members,
    name -> (weight, probabilities (N, C))."""
    w = dict(fu.Fusion.__dataclass_fields__["weights"].default_factory())
    w.update(weights or {})
    e = fu.EPS
    mod = (log_softmax(d["cnn_modality"], axis=1) + w["mod_native"] * np.log(d["p_mod_native"] + e)
           + w["mod_text"] * np.log(d["p_mod_text"] + e))
    rl = d["cnn_region"] if region_logits is None else region_logits
    reg = (cnn_weight * log_softmax(rl, axis=1) + w["reg_text"] * np.log(d["p_reg_text"] + e)
           + w["reg_emb"] * np.log(d["p_reg_emb"] + e) + w["reg_lex"] * np.log(d["p_reg_lex"] + e))
    for wt, p in (extra_region or {}).values():
        reg = reg + wt * np.log(p + e)
    if not pool:
        return mod, reg
    return fu.pool_by_group(mod, d["case_id"], fu.MOD_POOL), fu.pool_by_group(reg, d["case_id"])


def score(d: dict[str, Any], **kw: Any) -> dict[str, float]:
    """OOF accuracies: CNN alone (per image and pooled per case) and fused (shipped formula, pooled)."""
    mod, reg = fused_scores(d, **kw)
    cnn_reg = d["cnn_region"] if kw.get("region_logits") is None else kw["region_logits"]
    return {
        "n_images": len(d["region"]),
        "cnn_modality": float((d["cnn_modality"].argmax(1) == d["modality"]).mean()),
        "cnn_region": float((cnn_reg.argmax(1) == d["region"]).mean()),
        "cnn_region_pooled": float((fu.pool_by_group(log_softmax(cnn_reg, axis=1), d["case_id"]).argmax(1)
                                    == d["region"]).mean()),
        "modality": float((mod.argmax(1) == d["modality"]).mean()),
        "region": float((reg.argmax(1) == d["region"]).mean()),
    }


def confusion(pred: np.ndarray, true: np.ndarray, k: int) -> list[list[int]]:
    """Rows true class, columns predicted class."""
    m = np.zeros((k, k), dtype=int)
    np.add.at(m, (true, pred), 1)
    return m.tolist()


def load_fold_encoder(out_dir: str | Path, fold: int) -> Any:
    """The stored encoder of ``fold`` (its config beside the weights), in eval mode."""
    import json

    from safetensors.torch import load_file

    from solutions.medical_imaging.reporter import ImageEncoder, ReporterConfig

    cfg = ReporterConfig.from_dict(json.loads((Path(out_dir) / f"fold{fold}.json").read_text()))
    enc = ImageEncoder(cfg)
    enc.load_state_dict(load_file(str(Path(out_dir) / f"fold{fold}.safetensors")))
    return enc.eval()


def images_of(samples: Sequence[Any], size: int = 128) -> np.ndarray:
    return np.stack([load_image_array(s.image_path, size) for s in samples])
