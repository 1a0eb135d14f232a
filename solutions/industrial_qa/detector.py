"""The anomaly detector: self-supervised features + a coreset memory bank of normal patches.

Pipeline (one visible chain, see :meth:`AnomalyDetector.fit`)::

    train/good images --split--> fit set (SSL + memory bank) | held-out normals (calibration)
    fit set -> train_feature_net (synthetic-defect segmentation pretext, features.py)
               or, with a user-supplied ImageNet ResNet (--backbone), its frozen layer2+3 (backbone.py)
            -> patch features (N, h*w, D) -> PCA -> per tile of the grid (local_block x local_block
               cells, widened by local_radius): greedy k-center coreset (tiles, m, p)
    held-out normals -> maps -> per-map normalisation stats -> image scores -> Calibrator

Scoring an image ``(3, S, S)``: kNN distance of each patch feature to its tile's memory bank ``(h, w)``
and the pretext head's defect logit ``(h, w)`` are each standardised by their held-out-normal
statistics (per map position by default: borders and fixed structures of the product that are
unusual but normal stop dominating the maxima), fused, shifted by the part's median level, upsampled to ``(S, S)``, Gaussian-smoothed; the image score is the map's maximum.
The heatmap returned to users is resized to the input image's own resolution.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import DataError, ModelNotReady
from solutions.industrial_qa.backbone import BackboneNet, load_backbone
from solutions.industrial_qa.calibration import Calibrator
from solutions.industrial_qa.data import load_array, load_batch
from solutions.industrial_qa.features import FeatureConfig, FeatureNet, train_feature_net

Fusion = Literal["knn", "seg", "sum"]
LOCAL_CANDIDATES = 20_000   # fit patches drawn per tile of the per-position bank before its coreset
Norm = Literal["global", "position"]
Background = Literal["none", "median", "clip"]
FORMAT_VERSION = 1


@dataclass
class DetectorConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    coreset_size: int = 2048    # size of the one global bank (local_block = 0)
    bank_dim: int = 64          # PCA dimension of the memory bank (0 = full features): ~4x cheaper kNN
    patch_sample: int = 120_000
    # per-position memory bank: the stride-8 grid is tiled in local_block x local_block cells; each
    # tile's patches are compared only with fit patches from the tile widened by local_radius cells
    # (a coreset of local_bank per tile), so a patch that is normal somewhere on the part but not
    # here (border texture inside the part, a bright centre structure at the edge) stands out.
    # local_block 0 = one global bank of coreset_size patches. local_radius 0 (each tile's own cells,
    # a 32x32 px window at 256 px) chosen on `validate` over three SSL seeds against 2 (BENCHMARKS)
    local_block: int = 4
    local_radius: int = 0
    local_bank: int = 512
    holdout_fraction: float = 0.15
    min_holdout: int = 8
    target_far: float = 0.01
    fusion: Fusion = "sum"
    norm: Norm = "position"   # standardise maps per map position (or with one global mean/std)
    # subtract each part's median map level before scoring; "clip" (the default) caps the subtracted
    # median at the 95th percentile of the held-out normals' leave-one-out medians (stats["bg_cap"]):
    # a part-wide offset inside the normal range is removed, the excess of a part elevated over most of
    # its area is kept. Chosen on `validate` over three SSL seeds against "median" (pixel AUROC
    # +0.002 / +0.003 / +0.002, image AUROC and AUPRO equal: BENCHMARKS); models saved with "median" keep it
    background: Background = "clip"
    blur_sigma: float = 4.0
    batch_size: int = 32
    # coarse branch: (mean, std) of the patch features over a coarse_grid x coarse_grid grid of
    # regions, kNN to normal regions (PCA bank_dim, coreset coarse_bank); catches large-area
    # changes (uneven texture/brightness) that each local patch alone does not show. 0 = off
    coarse_grid: int = 8
    coarse_bank: int = 4096
    coarse_weight: float = 1.0
    # part-level (global) branch: (mean, std) of all the part's patch features, standardised, PCA
    # global_dim, distance to the nearest fit part, z-scored on the held-out normals; added to the
    # whole map x global_weight x the held-out scores' robust spread (robust_spread). Catches a part
    # whose overall texture is off (large diffuse defects) where no single patch or region is. 0 = off
    global_dim: int = 16
    global_weight: float = 0.5
    # two-scale input: the same net also scores each part at half resolution (2x2 average pooled,
    # 3x3 feature pooling) against its own PCA + per-position bank (tiles of local_block // 2 cells:
    # the same area of the part) with its own per-position statistics; that fused, part-median
    # subtracted map is upsampled to the stride-8 grid and added x scale2_weight. 0 = off.
    # 0.5 chosen on `validate` over three SSL seeds (image AUROC up on every seed, pixel AUROC and
    # AUPRO equal; 1.0 trades AUPRO; ~30% more scoring CPU: BENCHMARKS)
    scale2_weight: float = 0.5
    # part-median subtraction of the coarse map ("median": as the fused patch map; "none": the coarse
    # z-scores keep their level, so a texture change over more than half of the part is not cancelled
    # by its own median). "none" chosen on `validate` over three SSL seeds (pixel AUROC up on every
    # seed, +0.008 mean; AUPRO -0.008, image AUROC -0.001: BENCHMARKS). Inference only; models saved
    # before it load with "median"
    coarse_background: Background = "none"

    @classmethod
    def tiny(cls) -> DetectorConfig:
        """A seconds-to-train config (64 px, narrow net, 6 SSL steps) for tests and plumbing
        measurements (`verticals capacity --tiny-models`): exercises every stage, not quality."""
        # feature_pool 3: 5x5 cells of an 8x8 map (64 px) would blur away where a defect is
        return cls(features=FeatureConfig(image_size=64, widths=(8, 16, 24, 32), steps=6, batch_size=4, feature_pool=3),
                   coreset_size=64, local_bank=64, min_holdout=4, batch_size=8, coarse_grid=4, coarse_bank=64)

    def use_backbone(self, path: str | Path) -> DetectorConfig:
        """Use a user-supplied torchvision-layout ImageNet ResNet (backbone.py) instead of the
        self-supervised net: checked now (clear :class:`DataError` for a bad file), architecture
        recorded, fusion set to the kNN map (a frozen backbone has no pretext segmentation head)."""
        from solutions.industrial_qa.backbone import detect_arch, read_state_dict

        p = Path(path).expanduser().resolve()
        self.features.backbone_arch = detect_arch(read_state_dict(p))
        self.features.backbone = str(p)
        self.fusion = "knn"
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = self.features.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        d = dict(d)
        feats = FeatureConfig.from_dict(d.pop("features", {}))
        return cls(features=feats, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class MapOutput:
    """Per-batch outputs at model resolution: fused ``maps (B, S, S)``, ``scores (B,)`` and the raw
    stride-8 pieces the few-shot head reuses: ``feats (B, D, h, w)``, ``knn``/``seg`` ``(B, h, w)``."""

    maps: np.ndarray
    scores: np.ndarray
    feats: torch.Tensor
    knn: torch.Tensor
    seg: torch.Tensor
    coarse: torch.Tensor | None = None  # (B, h, w) context map (:meth:`AnomalyDetector.coarse_map`) or None


@dataclass
class InspectionResult:
    """What the line gets per part: heatmap at input resolution (H, W) in [0, 1] probability-like
    units, score, calibrated probability, decision, latency."""

    heatmap: np.ndarray
    score: float
    probability: float
    reject: bool
    latency_ms: float
    defect_type: str | None = None


def keep_freed_heap(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Ask glibc to keep freed buffers in the heap instead of returning them to the OS.

    Scoring allocates multi-MB activations per call; with glibc's defaults each one is a fresh
    ``mmap`` whose pages fault in again (~3,000 minor faults per 256 px image), a third of the scoring
    CPU went to the kernel. Raising ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` reuses them: 1.3x more
    images per CPU-second (BENCHMARKS). Process-wide, so called by the industrial-QA entry points
    (CLI commands, the worker's detector loader), not on import. Returns False where it does not
    apply (not glibc) and changes nothing then.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's mallopt parameter numbers
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_trim_threshold,
                                                                                 int(trim_threshold)))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` (reflect padding keeps borders unbiased)."""
    if sigma <= 0:
        return x
    r = int(round(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1))


@lru_cache(maxsize=16)
def _upsample_blur_matrix(n: int, size: int, sigma: float) -> torch.Tensor:
    """``(size, n)`` matrix of 1-D bilinear upsampling (align_corners=False) then the reflect-padded
    Gaussian blur of :func:`gaussian_blur`, built by pushing the identity through both."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n)[:, None, None, :]                                    # (n, 1, 1, n) rows e_j
        up = F.interpolate(eye, size=(1, size), mode="bilinear", align_corners=False)  # (n, 1, 1, S)
        if sigma > 0:
            r = int(round(3 * sigma))
            t = torch.arange(-r, r + 1, dtype=up.dtype)
            k = torch.exp(-0.5 * (t / sigma) ** 2)
            up = F.conv2d(F.pad(up, (r, r, 0, 0), mode="reflect"), (k / k.sum()).view(1, 1, 1, -1))
        return up[:, 0, 0, :].T.contiguous()                                   # (S, n)


@lru_cache(maxsize=16)
def block_cells(h: int, w: int, block: int, margin: int = 0) -> tuple[torch.Tensor, ...]:
    """Flat cell indices (row-major in an ``(h, w)`` grid) of each ``block x block`` tile, tiles in
    row-major order (edge tiles may be smaller), each widened by ``margin`` cells (clipped to the grid)."""
    out = []
    with torch.inference_mode(False):   # cached: must not be inference tensors (autograd callers index with them)
        for y in range(0, h, block):
            for x in range(0, w, block):
                ys = torch.arange(max(0, y - margin), min(h, y + block + margin))
                xs = torch.arange(max(0, x - margin), min(w, x + block + margin))
                out.append((ys[:, None] * w + xs[None, :]).flatten())
    return tuple(out)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where either optional map may be missing."""
    return b if a is None else a if b is None else a + b


def robust_spread(scores: torch.Tensor) -> torch.Tensor:
    """Spread of held-out image scores ``(n,)``: interquartile range / 1.349 (= the std for Gaussian
    scores). Leave-one-out scores of a few held-out parts are heavy-tailed (one part far off inflates
    the std several-fold: 18.7 on 9 held-out magnetic tiles vs 2.4-5.7 on other fits), which would scale the part-level
    term up with it; the quartiles barely move."""
    q = torch.quantile(scores.float(), torch.tensor([0.25, 0.75]))
    return (q[1] - q[0]) / 1.349 + 1e-6


def greedy_coreset(x: torch.Tensor, m: int, seed: int = 0, proj_dim: int = 64) -> torch.Tensor:
    """Indices of ``m`` rows of ``x (N, D)`` chosen by greedy k-center (PatchCore), computed in a
    random ``proj_dim`` projection (Johnson-Lindenstrauss) to keep it fast."""
    n = x.shape[0]
    if m >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    if x.shape[1] > proj_dim:
        proj = torch.randn(x.shape[1], proj_dim, generator=g) / proj_dim ** 0.5
        z = x @ proj
    else:
        z = x
    z = z.contiguous()
    idx = [int(torch.randint(n, (1,), generator=g))]
    dmin = ((z - z[idx[-1]]) ** 2).sum(1)                                   # (N,) squared distances
    for _ in range(m - 1):
        nxt = int(torch.argmax(dmin))
        idx.append(nxt)
        torch.minimum(dmin, ((z - z[nxt]) ** 2).sum(1), out=dmin)
    return torch.tensor(idx)


class AnomalyDetector:
    """Fit on normal parts, then score parts: heatmap, score, probability, decision."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.net: FeatureNet | BackboneNet | None = None   # SSL net, or a frozen user ResNet
        self.memory: torch.Tensor | None = None        # (M, p) normal patch features, or (tiles, m, p) per tile
        self.memory_sq: torch.Tensor | None = None     # (M,) / (tiles, m) squared norms (fast distances)
        self.bank_mean: torch.Tensor | None = None     # (D,) feature mean before the PCA projection
        self.bank_proj: torch.Tensor | None = None     # (D, p) PCA projection of patch features
        self.stats: dict[str, float] = {}              # mean/std of knn and seg maps on normals
        self.pos_stats: torch.Tensor | None = None      # (4, h, w) per-position knn/seg mean, std
        self.coarse_memory: torch.Tensor | None = None  # (Mc, p) normal region descriptors (PCA space)
        self.coarse_mean: torch.Tensor | None = None    # (2D,) region descriptor mean
        self.coarse_proj: torch.Tensor | None = None    # (2D, p) standardise + PCA, folded into one matrix
        self.coarse_stats: torch.Tensor | None = None   # (2, g, g) per-region mean, std on held-out normals
        self.part_memory: torch.Tensor | None = None    # (N, p) fit parts' descriptors (PCA space)
        self.part_mean: torch.Tensor | None = None      # (2D,) part descriptor mean
        self.part_proj: torch.Tensor | None = None      # (2D, p) standardise + PCA
        self.part_stats: torch.Tensor | None = None     # (3,) held-out distance mean, std; score spread
        self.s2: dict[str, torch.Tensor] = {}          # half-resolution bank: mean, proj, memory, stats
        self.s2_memory_sq: torch.Tensor | None = None  # its squared norms (derived, not saved)
        self.calibrator: Calibrator | None = None
        self.fewshot = None                             # solutions.industrial_qa.fewshot.FewShotHead
        self.info: dict = {}

    # --- fitting ---------------------------------------------------------------------------------
    def fit(self, paths: Sequence[Path], on_progress: Callable[[str, float], None] | None = None
            ) -> AnomalyDetector:
        """Fit on normal image files. ``on_progress(stage, fraction)`` reports progress."""
        cfg = self.config
        if len(paths) < 2 * cfg.min_holdout:
            raise DataError(f"need at least {2 * cfg.min_holdout} normal training images, got {len(paths)}")
        t0 = time.perf_counter()
        report = on_progress or (lambda stage, frac: None)
        rng = np.random.default_rng(cfg.features.seed)
        order = rng.permutation(len(paths))
        n_hold = max(cfg.min_holdout, int(round(cfg.holdout_fraction * len(paths))))
        hold = [paths[i] for i in sorted(order[:n_hold])]
        fit = [paths[i] for i in sorted(order[n_hold:])]
        size = cfg.features.image_size
        report("loading images", 0.0)
        images = load_batch(fit, size)
        if cfg.features.backbone:
            # a user-supplied ImageNet ResNet: frozen PatchCore features, no self-supervised step
            report("loading backbone", 0.0)
            self.net = load_backbone(cfg.features.backbone)
            cfg.features.backbone_arch = self.net.arch
        else:
            report("self-supervised training", 0.0)
            self.net = train_feature_net(images, cfg.features,
                                         on_step=lambda i, loss: report("self-supervised training",
                                                                        (i + 1) / cfg.features.steps))
        self.net = self.net.eval().to(memory_format=torch.channels_last)
        report("memory bank", 0.0)
        feats, regions, parts, feats2 = [], [], [], []
        with torch.inference_mode():
            for i in range(0, len(images), cfg.batch_size):
                xb = torch.from_numpy(images[i:i + cfg.batch_size]).contiguous(memory_format=torch.channels_last)
                f, _ = self.net(xb)
                feats.append(f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]))   # (b, h*w, D)
                if cfg.scale2_weight > 0:
                    f2, _ = self._half_forward(xb)
                    feats2.append(f2.permute(0, 2, 3, 1).reshape(f2.shape[0], -1, f2.shape[1]))
                if cfg.coarse_grid > 0:
                    r = self._regions(f)
                    regions.append(r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]))
                if cfg.global_dim > 0:
                    parts.append(self._regions(f, 1).flatten(1))
                report("memory bank", min(1.0, (i + cfg.batch_size) / len(images)) * 0.5)
        self._fit_patch_bank(torch.cat(feats), *f.shape[-2:])
        self.s2 = {}
        if feats2:
            h2, w2 = f2.shape[-2:]
            mean, proj, mem = self._patch_bank(torch.cat(feats2), h2, w2, self._s2_block(), 0)
            self.s2 = {"memory": mem} | ({"mean": mean, "proj": proj} if proj is not None else {})
        self.s2_memory_sq = (self.s2["memory"] ** 2).sum(-1) if "memory" in self.s2 else None
        self._fit_coarse_bank(torch.cat(regions) if regions else None)
        self.part_mean = self.part_proj = self.part_memory = self.part_stats = None
        if parts:   # every fit part is kept (one row per image)
            self.part_mean, self.part_proj, self.part_memory = self._pca_bank(torch.cat(parts), cfg.global_dim,
                                                                              len(images))
        report("calibration", 0.0)
        hold_x = load_batch(hold, size)
        hold_scores = self._fit_normalisation(hold_x)
        self.calibrator = Calibrator.fit(hold_scores, target_far=cfg.target_far)
        self.info = {"n_train": len(fit), "n_holdout": len(hold), "train_seconds": time.perf_counter() - t0,
                     "holdout_scores": [float(v) for v in hold_scores],
                     "holdout_paths": [str(p) for p in hold]}
        report("done", 1.0)
        return self

    def _fit_patch_bank(self, feats: torch.Tensor, h: int, w: int) -> None:
        """PCA + coreset memory bank of the fit parts' patch features ``(N, h*w, D)`` on an ``(h, w)``
        grid: one global bank, or one per tile of the grid (``local_block``)."""
        cfg = self.config
        self.bank_mean, self.bank_proj, self.memory = self._patch_bank(feats, h, w, cfg.local_block, cfg.local_radius)
        self.memory_sq = (self.memory ** 2).sum(-1)

    def _patch_bank(self, feats: torch.Tensor, h: int, w: int, block: int, radius: int
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(PCA mean, PCA projection (None without PCA), coreset bank ``(M, p)`` or per tile ``(tiles, m, p)``)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.features.seed)
        flat = feats.reshape(-1, feats.shape[-1])
        if flat.shape[0] > cfg.patch_sample:
            flat = flat[torch.randperm(flat.shape[0], generator=g)[: cfg.patch_sample]]
        mean = proj = None
        if 0 < cfg.bank_dim < flat.shape[1]:
            # PCA keeps the directions that carry the patch-to-patch distances; the kNN matmul then
            # costs bank_dim / D of the full one
            mu = flat.mean(0)
            cov = ((flat - mu).T @ (flat - mu)) / max(flat.shape[0] - 1, 1)
            _, vecs = torch.linalg.eigh(cov.double())
            mean, proj = mu, vecs[:, -cfg.bank_dim:].flip(1).float().contiguous()
        if block <= 0:
            flat = self._project(flat, mean, proj)
            return mean, proj, flat[greedy_coreset(flat, cfg.coreset_size, cfg.features.seed)].contiguous()
        q = self._project(feats, mean, proj)                                  # (N, h*w, p)
        cands = []
        for cells in block_cells(h, w, block, radius):
            c = q[:, cells].reshape(-1, q.shape[-1])
            if c.shape[0] > LOCAL_CANDIDATES:
                c = c[torch.randperm(c.shape[0], generator=g)[:LOCAL_CANDIDATES]]
            cands.append(c)
        m = min(cfg.local_bank, *(c.shape[0] for c in cands))   # equal sizes: one batched search
        return mean, proj, torch.stack([c[greedy_coreset(c, m, cfg.features.seed)] for c in cands]).contiguous()

    def _project(self, f: torch.Tensor, mean: torch.Tensor | None = None, proj: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Patch features ``(..., D)`` -> a PCA space ``(..., p)`` (the bank's unless given; unchanged without PCA)."""
        if proj is None and mean is None:
            mean, proj = self.bank_mean, self.bank_proj
        return f if proj is None else (f - mean) @ proj

    def _knn(self, q: torch.Tensor, h: int, w: int, mem: torch.Tensor | None = None,
             msq: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
        """Distance of projected patch features ``q (B, h*w, p)`` to their nearest bank patch ``(B, h*w)``:
        the global bank, or the bank of each cell's tile (the main bank unless ``mem`` / ``msq`` / ``block``)."""
        if mem is None:
            mem, msq, block = self.memory, self.memory_sq, self.config.local_block
        assert mem is not None and msq is not None
        # min over the bank of |m|^2 - 2 q.m (one fused addmm per row chunk / tile), then + |q|^2:
        # the full (B*h*w, M) distance matrix never exists
        if mem.dim() == 2:
            d = torch.cat([torch.addmm(msq[None], c, mem.T, alpha=-2).min(dim=1).values
                           for c in q.reshape(-1, q.shape[-1]).split(2048)]).view(q.shape[:2])
        else:
            tiles = block_cells(h, w, block)
            if len(tiles) != mem.shape[0]:
                raise DataError(f"the model's per-position bank has {mem.shape[0]} tiles, this map needs {len(tiles)}")
            d = q.new_empty(q.shape[:2])
            for k, cells in enumerate(tiles):
                d[:, cells] = torch.addmm(msq[k][None], q[:, cells].reshape(-1, q.shape[-1]), mem[k].T,
                                          alpha=-2).min(dim=1).values.view(q.shape[0], -1)
        return (d + (q ** 2).sum(-1)).clamp_min(0).sqrt()

    def _s2_block(self) -> int:
        """Tile size of the half-resolution bank: the main tiles' part area (0 = one global bank)."""
        return max(1, self.config.local_block // 2) if self.config.local_block > 0 else 0

    def _half_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The net on the parts ``(B, 3, S, S)`` at half resolution (2x2 average): features / logits at S/16."""
        net = self.net
        if net is None:
            raise ModelNotReady("the detector has not been trained; run `verticals industrial-qa train`")
        x2 = F.avg_pool2d(x, 2).contiguous(memory_format=torch.channels_last)
        return net(x2, pool=3) if isinstance(net, FeatureNet) else net(x2)

    def _s2_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Half-resolution raw maps of ``x (B, 3, S, S)``: (kNN distance, pretext logit) ``(B, S/16, S/16)``
        each, or None when the two-scale branch is off (or the model has no half-resolution bank)."""
        mem = self.s2.get("memory")
        if self.config.scale2_weight <= 0 or mem is None:
            return None
        f, logits = self._half_forward(x)
        b, d, h, w = f.shape
        q = self._project(f.permute(0, 2, 3, 1).reshape(b, h * w, d), self.s2.get("mean"), self.s2.get("proj"))
        return self._knn(q, h, w, mem, self.s2_memory_sq, self._s2_block()).view(b, h, w), logits[:, 0]

    def _s2_term(self, kz: torch.Tensor, sz: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Standardised half-resolution maps ``(B, h2, w2)`` -> the term added to the stride-8 map ``(B, h, w)``:
        fused as the main maps, part median subtracted, upsampled, x ``scale2_weight``."""
        z = self._fused_z(kz, sz)
        z = z - z.flatten(1).median(1).values[:, None, None]
        return self.config.scale2_weight * F.interpolate(z[:, None], size=(h, w), mode="bilinear",
                                                         align_corners=False)[:, 0]

    def scale2_map(self, x: torch.Tensor, h: int, w: int,
                   raw: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Two-scale term ``(B, h, w)`` for parts ``x (B, 3, S, S)`` (``raw``: precomputed :meth:`_s2_raw`),
        standardised with the held-out normals' per-position statistics; None when off."""
        st = self.s2.get("stats")
        r = self._s2_raw(x) if raw is None else raw
        if r is None or st is None:
            return None
        return self._s2_term((r[0] - st[0]) / st[1], (r[1] - st[2]) / st[3], h, w)

    def _regions(self, feats: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """Region descriptors ``(B, 2D, g, g)``: mean and std of the patch features ``(B, D, h, w)``
        over a ``g x g`` grid of regions (texture statistics at 1/g of the part; ``grid`` defaults to
        ``coarse_grid``, 1 = the whole part)."""
        g = grid or self.config.coarse_grid
        f = feats.float().contiguous()
        mu = F.adaptive_avg_pool2d(f, g)
        sd = (F.adaptive_avg_pool2d(f * f, g) - mu * mu).clamp_min(0).sqrt()
        return torch.cat([mu, sd], 1)

    def _fit_coarse_bank(self, regions: torch.Tensor | None) -> None:
        """Standardise + PCA + coreset of the normal region descriptors ``(N, 2D)`` (None: branch off)."""
        cfg = self.config
        self.coarse_memory = self.coarse_mean = self.coarse_proj = self.coarse_stats = None
        if regions is None or cfg.coarse_grid <= 0 or regions.shape[0] < 4:
            return
        self.coarse_mean, self.coarse_proj, self.coarse_memory = self._pca_bank(regions, cfg.bank_dim, cfg.coarse_bank)

    def _pca_bank(self, x: torch.Tensor, dim: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Descriptors ``x (N, d)`` -> (mean ``(d,)``, standardise + PCA to ``dim`` (0 = all) folded into one
        ``(d, p)`` matrix, coreset of ``size`` rows of the projected descriptors ``(m, p)``)."""
        mu, sd = x.mean(0), x.std(0) + 1e-6
        z = (x - mu) / sd
        p = min(dim if dim > 0 else z.shape[1], z.shape[1])
        cov = (z.T @ z) / max(z.shape[0] - 1, 1)
        _, vecs = torch.linalg.eigh(cov.double())
        proj = (vecs[:, -p:].flip(1).float() / sd[:, None]).contiguous()   # standardisation folded in
        bank = (x - mu) @ proj
        return mu, proj, bank[greedy_coreset(bank, size, self.config.features.seed)].contiguous()

    def _part_raw(self, feats: torch.Tensor) -> torch.Tensor | None:
        """Distance of each part's descriptor to the nearest fit part's ``(B,)`` (None when off)."""
        mem, mean, proj = self.part_memory, self.part_mean, self.part_proj
        if mem is None or mean is None or proj is None or feats.shape[1] != mean.shape[0] // 2:
            return None
        return torch.cdist((self._regions(feats, 1).flatten(1) - mean) @ proj, mem).min(1).values

    def _coarse_raw(self, feats: torch.Tensor) -> torch.Tensor | None:
        """kNN distance of each region to the normal regions ``(B, g, g)`` (None when the branch is off)."""
        mem, mean, proj = self.coarse_memory, self.coarse_mean, self.coarse_proj
        if mem is None or mean is None or proj is None or feats.shape[1] != mean.shape[0] // 2:
            return None
        r = self._regions(feats)
        b, d, g, _ = r.shape
        q = (r.permute(0, 2, 3, 1).reshape(-1, d) - mean) @ proj
        return torch.cdist(q, mem).min(1).values.view(b, g, g)

    def coarse_map(self, feats: torch.Tensor, raw: torch.Tensor | None = None,
                   part_raw: torch.Tensor | None = None) -> torch.Tensor | None:
        """Context map on the stride-8 grid ``(B, h, w)``, added to the fused patch map: the
        standardised, part-median-subtracted coarse map upsampled x ``coarse_weight``, plus the
        part-level term (uniform over the part) x ``global_weight`` x the held-out score spread
        (:func:`robust_spread`; models fitted before it store the plain std).
        ``raw`` / ``part_raw``: precomputed raw distances (else computed from ``feats``). None when
        both branches are off."""
        b, h, w = feats.shape[0], *feats.shape[-2:]
        out = None
        c = self._coarse_raw(feats) if raw is None else raw
        if c is not None and self.coarse_stats is not None:
            z = (c - self.coarse_stats[0]) / self.coarse_stats[1]
            if self.config.coarse_background == "median":
                z = z - z.flatten(1).median(1).values[:, None, None]
            out = self.config.coarse_weight * F.interpolate(z[:, None], size=(h, w), mode="bilinear",
                                                            align_corners=False)[:, 0]
        d = self._part_raw(feats) if part_raw is None else part_raw
        if d is not None and self.part_stats is not None:
            mu, sd, spread = self.part_stats
            g = (self.config.global_weight * spread * (d - mu) / sd)[:, None, None].expand(b, h, w)
            out = g if out is None else out + g
        return out

    @staticmethod
    def _loo_z(m: torch.Tensor, floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Leave-one-out per-position z-scores of ``m (n, h, w)`` and the all-in mean, std ``(h, w)``;
        ``floor`` on the std (default a quarter of the mean per-position std: keeps near-constant
        positions finite)."""
        if floor is None:
            floor = 0.25 * float(m.std(0).mean()) + 1e-6
        n = m.shape[0]
        tot, tot2 = m.sum(0), (m ** 2).sum(0)
        mu_loo = (tot[None] - m) / (n - 1)                              # (n, h, w)
        var_loo = ((tot2[None] - m ** 2) - (n - 1) * mu_loo ** 2) / (n - 2)
        return (m - mu_loo) / var_loo.clamp_min(0).sqrt().clamp_min(floor), tot / n, m.std(0).clamp_min(floor)

    def _raw_maps(self, hold_x: np.ndarray, keep_feats: bool = False) -> tuple[
            torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
            tuple[torch.Tensor, torch.Tensor] | None]:
        """Raw maps of ``hold_x (n, 3, S, S)`` in batches: (features if ``keep_feats``, knn, seg, coarse raw
        distances or None, part-level raw distances ``(n,)`` or None, half-resolution (knn, seg) or None)."""
        feats, knn, seg, coarse, part, half = [], [], [], [], [], []
        for i in range(0, len(hold_x), self.config.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(hold_x[i:i + self.config.batch_size]))
            f, k, s = self._raw(xb)
            r2 = self._s2_raw(xb)
            if r2 is not None:
                half.append(r2)
            knn.append(k)
            seg.append(s)
            c = self._coarse_raw(f)
            if c is not None:
                coarse.append(c)
            d = self._part_raw(f)
            if d is not None:
                part.append(d)
            if keep_feats:
                feats.append(f)
        return (torch.cat(feats) if feats else None, torch.cat(knn), torch.cat(seg),
                torch.cat(coarse) if coarse else None, torch.cat(part) if part else None,
                (torch.cat([r[0] for r in half]), torch.cat([r[1] for r in half])) if half else None)

    @torch.inference_mode()
    def _fit_normalisation(self, hold_x: np.ndarray) -> np.ndarray:
        """Map statistics from held-out normals ``(n, 3, S, S)``; returns their image scores ``(n,)``.

        Per-position statistics are fitted on the same images the calibrator then uses, so each
        held-out image is scored with leave-one-out statistics (closed form): otherwise its own map
        would be in its normaliser and the threshold would come out too low.
        """
        # (n, h, w) each; coarse (n, g, g), part (n,), half resolution 2 x (n, h/2, w/2)
        _, k_all, s_all, c_all, p_all, h_all = self._raw_maps(hold_x)
        self.coarse_stats = self.part_stats = None
        self.s2.pop("stats", None)
        if c_all is not None and c_all.shape[0] >= 3:
            # held-out images are scored with leave-one-out statistics, as for the stride-8 maps
            c_loo, c_mu, c_sd = self._loo_z(c_all)
            self.coarse_stats = torch.stack([c_mu, c_sd])
        self.stats = {"knn_mean": float(k_all.mean()), "knn_std": float(k_all.std()) + 1e-6,
                      "seg_mean": float(s_all.mean()), "seg_std": float(s_all.std()) + 1e-6}
        n = k_all.shape[0]
        self.pos_stats = None
        if self.config.norm == "global" or n < 3:
            self.coarse_stats = None
            return self.score_arrays(hold_x).scores
        parts, loo = [], []
        for m in (k_all, s_all):
            z, mu, sd = self._loo_z(m)
            loo.append(z)
            parts += [mu, sd]
        self.pos_stats = torch.stack(parts)                                 # (4, h, w)
        cz = None
        if self.coarse_stats is not None:
            cz = c_loo if self.config.coarse_background == "none" else (
                c_loo - c_loo.flatten(1).median(1).values[:, None, None])
            cz = self.config.coarse_weight * F.interpolate(cz[:, None], size=k_all.shape[-2:], mode="bilinear",
                                                           align_corners=False)[:, 0]
        if h_all is not None:
            (kz2, km, ksd), (sz2, sm, ssd) = self._loo_z(h_all[0]), self._loo_z(h_all[1])
            self.s2["stats"] = torch.stack([km, ksd, sm, ssd])                # (4, h/2, w/2)
            cz = _plus(cz, self._s2_term(kz2, sz2, *k_all.shape[-2:]))
        if self.config.background == "clip":
            # the cap is fixed before the held-out scores are computed, so they see what new parts will
            self.stats["bg_cap"] = float(torch.quantile(self._fused_z(loo[0], loo[1]).flatten(1).median(1).values,
                                                        0.95))
        small = self._combine(loo[0], loo[1], cz)
        scores = self.upsample(small, hold_x.shape[-1]).flatten(1).max(1).values
        if p_all is not None:
            # the part-level term is a uniform shift of the map, in units of the held-out scores' spread
            p_loo, p_mu, p_sd = self._loo_z(p_all)
            spread = robust_spread(scores)
            self.part_stats = torch.stack([p_mu, p_sd, spread])
            scores = scores + self.config.global_weight * spread * p_loo
        return scores.numpy()

    @torch.inference_mode()
    def holdout_outputs(self, hold_x: np.ndarray) -> MapOutput:
        """Unsupervised outputs for the held-out normals ``(n, 3, S, S)`` the map statistics were
        fitted on, each scored with leave-one-out statistics (what the calibrator sees).

        :meth:`score_arrays` on these images would standardise each map with statistics that contain
        that map itself, so they would look more normal than any new normal part (a few-shot head
        fitted against them learns a too easy negative class). Here ``knn`` / ``seg`` (and the coarse
        raw distances) are returned as the raw values whose standardisation under the stored
        statistics equals their leave-one-out z-score, so every downstream consumer
        (``standardise``, ``fuse``, the few-shot heads) sees unbiased values. With global statistics
        (or fewer than 3 images) this is :meth:`score_arrays` unchanged.
        """
        ps = self.pos_stats
        if ps is None or len(hold_x) < 3:
            saved, self.fewshot = self.fewshot, None
            try:
                return self.score_arrays(hold_x)
            finally:
                self.fewshot = saved
        f_all, k_all, s_all, c_all, p_all, h_all = self._raw_maps(hold_x, keep_feats=True)
        assert f_all is not None
        if ps.shape[-2:] != k_all.shape[-2:]:
            raise DataError("held-out images do not match the model's map size")
        eq = []
        for m, mu, sd in ((k_all, ps[0], ps[1]), (s_all, ps[2], ps[3])):
            z, _, _ = self._loo_z(m)   # as in _fit_normalisation
            eq.append(z * sd + mu)
        c_eq = p_eq = None
        if self.coarse_stats is not None and c_all is not None:
            z, _, _ = self._loo_z(c_all)
            c_eq = z * self.coarse_stats[1] + self.coarse_stats[0]
        if self.part_stats is not None and p_all is not None:
            z, _, _ = self._loo_z(p_all)
            p_eq = z * self.part_stats[1] + self.part_stats[0]
        cz = self.coarse_map(f_all, raw=c_eq, part_raw=p_eq)
        if h_all is not None and "stats" in self.s2:
            cz = _plus(cz, self._s2_term(self._loo_z(h_all[0])[0], self._loo_z(h_all[1])[0], *k_all.shape[-2:]))
        maps = self.upsample(self.fuse(eq[0], eq[1], cz), hold_x.shape[-1])
        return MapOutput(maps.numpy(), maps.flatten(1).max(1).values.numpy(), f_all, eq[0], eq[1], cz)

    def recalibrate(self) -> None:
        """Refit normalisation and calibrator on the held-out normals after an inference setting changed."""
        hold = [Path(p) for p in self.info.get("holdout_paths", [])]
        if not hold:
            raise ModelNotReady("this model has no held-out normals recorded; retrain it")
        scores = self._fit_normalisation(load_batch(hold, self.config.features.image_size))
        self.calibrator = Calibrator.fit(scores, target_far=self.config.target_far)
        self.info["holdout_scores"] = [float(v) for v in scores]

    # --- scoring ---------------------------------------------------------------------------------
    def _require(self) -> FeatureNet | BackboneNet:
        if self.net is None or self.memory is None:
            raise ModelNotReady("the detector has not been trained; run `verticals industrial-qa train`")
        return self.net

    def _raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, 3, S, S)`` -> (feats (B, D, h, w), knn distance (B, h, w), seg logit (B, h, w))."""
        net = self._require()
        # channels_last: oneDNN's NHWC convolutions are ~2x faster on CPU (measured, BENCHMARKS.md)
        feats, logits = net(x.contiguous(memory_format=torch.channels_last))
        b, d, h, w = feats.shape
        q = self._project(feats.permute(0, 2, 3, 1).reshape(b, h * w, d))    # (B, h*w, p)
        return feats, self._knn(q, h, w).view(b, h, w), logits[:, 0]

    def standardise(self, knn: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z-scores of the stride-8 maps ``(B, h, w)`` against held-out normals (per position when fitted)."""
        ps = self.pos_stats
        if ps is not None and ps.shape[-2:] == knn.shape[-2:]:
            return (knn - ps[0]) / ps[1], (seg - ps[2]) / ps[3]
        st = self.stats
        return (knn - st["knn_mean"]) / st["knn_std"], (seg - st["seg_mean"]) / st["seg_std"]

    def fuse(self, knn: torch.Tensor, seg: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise and combine the stride-8 maps ``(B, h, w)`` per the configured fusion;
        ``coarse`` is the context map (:meth:`coarse_map`, weights applied), added."""
        return self._combine(*self.standardise(knn, seg), coarse)

    def _fused_z(self, kz: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return kz if self.config.fusion == "knn" else sz if self.config.fusion == "seg" else kz + sz

    def _combine(self, kz: torch.Tensor, sz: torch.Tensor, cz: torch.Tensor | None = None) -> torch.Tensor:
        z = self._fused_z(kz, sz)
        if self.config.background in ("median", "clip"):
            # a part-wide offset (lighting, texture density) is normal variation, not a defect; the
            # median only moves when more than half of the part is elevated. "clip": only as far as
            # held-out normal parts' medians go (without a fitted cap: the plain median)
            med = z.flatten(1).median(1).values
            if self.config.background == "clip" and "bg_cap" in self.stats:
                med = med.clamp(max=self.stats["bg_cap"])
            z = z - med[:, None, None]
        if cz is not None:
            z = z + cz
        return z

    def upsample(self, small: torch.Tensor, size: int) -> torch.Tensor:
        """Stride-8 map ``(B, h, w)`` -> smoothed ``(B, S, S)``.

        Bilinear upsampling and the Gaussian blur are both separable linear maps, so the pair is
        one ``(S, h)`` matrix per axis: ``A_y @ small @ A_x.T`` (two small matmuls, ~30x cheaper than
        a 1-channel convolution at full size; equal to interpolate + gaussian_blur up to rounding).
        """
        ay = _upsample_blur_matrix(small.shape[-2], size, self.config.blur_sigma)
        ax = _upsample_blur_matrix(small.shape[-1], size, self.config.blur_sigma)
        return ay @ small.float() @ ax.T

    @torch.inference_mode()
    def score_arrays(self, x: np.ndarray) -> MapOutput:
        """Score a batch ``(B, 3, S, S)`` float32 in [0, 1] at model resolution."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"expected images (B, 3, S, S), got shape {tuple(x.shape)}")
        outs, coarse_parts = [], []
        for i in range(0, len(x), self.config.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + self.config.batch_size]))
            feats, knn, seg = self._raw(xb)
            cz = _plus(self.coarse_map(feats), self.scale2_map(xb, *knn.shape[-2:]))
            if self.fewshot is not None:
                small = self.fewshot.patch_map(self, feats, knn, seg, cz)
            else:
                small = self.fuse(knn, seg, cz)
            maps = self.upsample(small, x.shape[-1])
            scores = maps.flatten(1).max(1).values
            if self.fewshot is not None:
                scores = self.fewshot.image_score(self, feats, knn, seg, maps, cz)
            outs.append((maps, scores, feats, knn, seg))
            if cz is not None:
                coarse_parts.append(cz)
        cat = [torch.cat([o[j] for o in outs]) for j in range(5)]
        coarse = torch.cat(coarse_parts) if coarse_parts and len(coarse_parts) == len(outs) else None
        return MapOutput(cat[0].numpy(), cat[1].numpy(), cat[2], cat[3], cat[4], coarse)

    def inspect_images(self, sources: Sequence[Path | bytes], threshold: float | None = None
                       ) -> list[InspectionResult]:
        """Full per-part output for image files (or bytes); heatmaps at each input's resolution.

        ``threshold`` overrides the calibrated line threshold for the accept/reject decision only.
        """
        if self.calibrator is None:
            raise ModelNotReady("the detector has no calibration; retrain it")
        size = self.config.features.image_size
        t0 = time.perf_counter()
        loaded = [load_array(s, size) for s in sources]
        arr = np.stack([a for a, _ in loaded])
        out = self.score_arrays(arr)
        probs = self.calibrator.probability(out.scores)
        per = (time.perf_counter() - t0) * 1000 / max(len(sources), 1)
        types = self.fewshot.defect_types(out.feats, out.maps) if self.fewshot is not None else None
        results = []
        for i, (_, (h, w)) in enumerate(loaded):
            # heatmap in probability units so 0.5 sits at the decision threshold
            m = torch.from_numpy(self.calibrator.probability(out.maps[i]).astype(np.float32))
            heat = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            reject = bool(out.scores[i] > threshold) if threshold is not None else bool(
                self.calibrator.decide(out.scores[i]))
            results.append(InspectionResult(heat.numpy(), float(out.scores[i]), float(probs[i]), reject, per,
                                            types[i] if (types is not None and reject) else None))
        return results

    # --- persistence -----------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        """Write ``weights.safetensors`` + ``detector.json`` into ``folder`` (created)."""
        from safetensors.torch import save_file

        net = self._require()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
        tensors["memory"] = self.memory.contiguous()
        if self.bank_proj is not None:
            tensors["bank_mean"], tensors["bank_proj"] = self.bank_mean.contiguous(), self.bank_proj.contiguous()
        if self.pos_stats is not None:
            tensors["pos_stats"] = self.pos_stats.contiguous()
        cm, cmean, cproj = self.coarse_memory, self.coarse_mean, self.coarse_proj
        if cm is not None and cmean is not None and cproj is not None:
            tensors |= {"coarse_memory": cm.contiguous(), "coarse_mean": cmean.contiguous(),
                        "coarse_proj": cproj.contiguous()}
            if self.coarse_stats is not None:
                tensors["coarse_stats"] = self.coarse_stats.contiguous()
        part = {"part_memory": self.part_memory, "part_mean": self.part_mean, "part_proj": self.part_proj,
                "part_stats": self.part_stats}
        tensors |= {k: v.contiguous() for k, v in part.items() if v is not None}
        tensors |= {f"s2_{k}": v.contiguous() for k, v in self.s2.items()}
        meta = {"format": FORMAT_VERSION, "config": self.config.to_dict(), "stats": self.stats,
                "calibrator": self.calibrator.to_dict() if self.calibrator else None, "info": self.info}
        if self.fewshot is not None:
            tensors.update(self.fewshot.tensors())
            meta["fewshot"] = self.fewshot.meta()
        save_file(tensors, str(folder / "weights.safetensors"))
        (folder / "detector.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path) -> AnomalyDetector:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "detector.json").is_file() or not (folder / "weights.safetensors").is_file():
            raise ModelNotReady(f"no trained detector in {folder}")
        meta = json.loads((folder / "detector.json").read_text())
        cfg = dict(meta["config"])
        cfg.setdefault("norm", "global")  # models saved before per-position statistics existed
        cfg.setdefault("background", "none")
        cfg.setdefault("bank_dim", 0)  # models saved before the PCA bank
        cfg.setdefault("local_block", 0)  # models saved before the per-position bank: one global bank
        cfg.setdefault("coarse_grid", 0)  # models saved before the coarse branch
        cfg.setdefault("global_dim", 0)  # models saved before the part-level branch
        cfg.setdefault("scale2_weight", 0.0)  # models saved before the two-scale branch
        cfg.setdefault("coarse_background", "median")  # models saved before the option
        det = cls(DetectorConfig.from_dict(cfg))
        tensors = load_file(str(folder / "weights.safetensors"))
        arch = det.config.features.backbone_arch
        det.net = BackboneNet(arch) if arch else FeatureNet(det.config.features)
        det.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        det.net = det.net.eval().to(memory_format=torch.channels_last)
        det.memory = tensors["memory"]
        det.memory_sq = (det.memory ** 2).sum(-1)
        det.bank_mean, det.bank_proj = tensors.get("bank_mean"), tensors.get("bank_proj")
        det.stats = meta["stats"]
        det.pos_stats = tensors.get("pos_stats")
        det.coarse_memory, det.coarse_mean = tensors.get("coarse_memory"), tensors.get("coarse_mean")
        det.coarse_proj, det.coarse_stats = tensors.get("coarse_proj"), tensors.get("coarse_stats")
        det.part_memory, det.part_mean = tensors.get("part_memory"), tensors.get("part_mean")
        det.part_proj, det.part_stats = tensors.get("part_proj"), tensors.get("part_stats")
        det.s2 = {k[3:]: v for k, v in tensors.items() if k.startswith("s2_")}
        det.s2_memory_sq = (det.s2["memory"] ** 2).sum(-1) if "memory" in det.s2 else None
        det.calibrator = Calibrator.from_dict(meta["calibrator"]) if meta.get("calibrator") else None
        det.info = meta.get("info", {})
        if meta.get("fewshot"):
            from solutions.industrial_qa.fewshot import FewShotHead

            det.fewshot = FewShotHead.from_saved(meta["fewshot"], tensors)
        return det
