"""A small convolutional feature extractor trained self-supervised on the line's own normal parts.

No ImageNet weights are available, so the encoder learns from the normal images alone by a
DRAEM/CutPaste-style pretext task: synthetic defects (pasted patches, noise-shaped blends of another
part's texture, scratches, spots) are drawn on normal images and the network learns to segment them.
Two things come out of it:

* patch features ``(B, D, S/8, S/8)`` (stage-3 features plus upsampled stage-4 features, locally
  averaged as in PatchCore) for a nearest-neighbour memory bank of normal patches, and
* a segmentation logit map ``(B, 1, S/8, S/8)`` from the pretext head, itself an anomaly map.

All defect synthesis is generic (no product-specific shapes), so the same recipe applies to any
MVTec-layout product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FeatureConfig:
    """Every knob of the extractor and of its self-supervised training (saved with the model)."""

    image_size: int = 256
    widths: tuple[int, int, int, int] = (24, 48, 96, 128)
    steps: int = 400
    batch_size: int = 16
    train_crop: int = 128  # random crops for SSL (the net is fully convolutional): ~4x cheaper steps
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # input normalisation: "dataset" = the fit images' channel mean/std; "image" = each image's own
    # mean/std (parts vary in brightness and contrast from part to part: normal variation)
    input_norm: str = "image"
    # pretext target per head cell: "mean" = the fraction of its pixels that are synthetic defect,
    # "max" = 1 when any is (a thin scratch then counts as fully defective, not as ~0.2), "mix" =
    # their average (chosen on `validate` over two seeds: AUPRO 0.86 vs 0.77, image AUROC equal)
    seg_target: str = "mix"
    # k x k local averaging of the patch features (PatchCore's 3x3 neighbourhood context; odd k, 1 = off).
    # Inference only: the pretext head sees the unpooled features, so the SSL step is unchanged.
    # 5 chosen on `validate` over three SSL seeds (pixel AUROC +0.008 on every seed, image AUROC
    # equal, AUPRO -0.005; 7 trades further, 1 the other way: BENCHMARKS)
    feature_pool: int = 5
    # a user-supplied ImageNet ResNet checkpoint (backbone.py) replaces the self-supervised net:
    # path as given, and the architecture detected from it (set by AnomalyDetector.fit)
    backbone: str = ""
    backbone_arch: str = ""

    def __post_init__(self) -> None:
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool must be an odd size >= 1, got {self.feature_pool}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureConfig:
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        d.setdefault("input_norm", "dataset")  # models saved before the option existed
        d.setdefault("seg_target", "mean")  # models trained before the option: fraction targets
        d.setdefault("feature_pool", 3)  # models saved before the option: 3x3
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FeatureNet(nn.Module):
    """Encoder (strides 2, 4, 8, 16) + a light segmentation head at stride 8.

    Input ``(B, 3, S, S)`` in [0, 1] (normalised inside with the line's channel mean/std).
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        w1, w2, w3, w4 = cfg.widths
        self.cfg = cfg
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.stem = _conv(3, w1, 2)                                  # (B, w1, S/2, S/2)
        self.stage2 = nn.Sequential(_conv(w1, w2, 2), _conv(w2, w2))  # (B, w2, S/4, S/4)
        self.stage3 = nn.Sequential(_conv(w2, w3, 2), _conv(w3, w3))  # (B, w3, S/8, S/8)
        self.stage4 = nn.Sequential(_conv(w3, w4, 2), _conv(w4, w4))  # (B, w4, S/16, S/16)
        d = w2 + w3 + w4
        self.head = nn.Sequential(nn.Conv2d(d, 64, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, 1, 1))

    @property
    def feature_dim(self) -> int:
        return sum(self.cfg.widths[1:])

    def forward(self, x: torch.Tensor, pool: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (patch features (B, D, S/8, S/8), segmentation logits (B, 1, S/8, S/8)); ``pool``
        overrides ``feature_pool`` (the detector's half-resolution pass uses 3)."""
        if self.cfg.input_norm == "image":
            mu = x.mean(dim=(1, 2, 3), keepdim=True)
            sd = x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mu) / sd.clamp_min(0.01)  # a near-blank part is not blown up into noise
        else:
            x = (x - self.mean) / self.std
        f2 = self.stage2(self.stem(x))
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        size = f3.shape[-2:]
        feats = torch.cat([F.avg_pool2d(f2, 2), f3, F.interpolate(f4, size=size, mode="bilinear",
                                                                  align_corners=False)], dim=1)
        logits = self.head(feats)
        # k x k local averaging gives each patch feature some neighbourhood context (PatchCore: 3x3)
        k = self.cfg.feature_pool if pool is None else pool
        if k > 1:
            feats = F.avg_pool2d(feats, k, 1, k // 2, count_include_pad=False)
        return feats, logits


# --- synthetic defects --------------------------------------------------------------------------


def _smooth_noise_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blob-shaped binary mask from thresholded, upsampled random noise (Perlin-like)."""
    cells = int(rng.choice([4, 8, 16]))
    noise = torch.from_numpy(rng.standard_normal((1, 1, cells, cells)).astype(np.float32))
    noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    thr = np.quantile(noise, 1.0 - rng.uniform(0.01, 0.08))
    return (noise > thr).astype(np.float32)


def _rect_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    area = rng.uniform(0.003, 0.04) * size * size
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    h = int(np.clip(math.sqrt(area * aspect), 4, size // 2))
    w = int(np.clip(area / h, 4, size // 2))
    y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
    m = np.zeros((size, size), np.float32)
    m[y:y + h, x:x + w] = 1.0
    return m, (y, x, h, w)


def _scratch_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin random polyline (scratches, cracks, fibres)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    n = int(rng.integers(2, 6))
    pts = [(float(rng.uniform(0, size)), float(rng.uniform(0, size)))]
    step = rng.uniform(0.05, 0.2) * size
    ang = rng.uniform(0, 2 * math.pi)
    for _ in range(n):
        ang += rng.normal(0, 0.6)
        x, y = pts[-1]
        pts.append((x + step * math.cos(ang), y + step * math.sin(ang)))
    draw.line(pts, fill=255, width=int(rng.integers(1, max(2, size // 64) + 2)))
    return (np.asarray(im) > 0).astype(np.float32)


def synthesize_defects(images: np.ndarray, rng: np.random.Generator,
                       p_clean: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Draw one generic synthetic defect on each image (some are left clean).

    Args:
        images: float32 ``(B, 3, S, S)`` in [0, 1], normal parts.
    Returns:
        (augmented images ``(B, 3, S, S)``, masks ``(B, S, S)`` in {0, 1}).
    """
    b, _, s, _ = images.shape
    out = images.copy()
    masks = np.zeros((b, s, s), np.float32)
    for i in range(b):
        if rng.random() < p_clean:
            continue
        kind = rng.choice(["cutpaste", "blend", "scratch", "spot"])
        img = out[i]
        if kind == "cutpaste":
            m, (y, x, h, w) = _rect_mask(rng, s)
            src = images[int(rng.integers(0, b))]
            sy, sx = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
            patch = src[:, sy:sy + h, sx:sx + w]
            if rng.random() < 0.5:
                patch = patch[:, ::-1, :]
            patch = np.clip(patch * rng.uniform(0.6, 1.4) + rng.uniform(-0.15, 0.15), 0, 1)
            img[:, y:y + h, x:x + w] = patch
            masks[i] = m
        elif kind == "blend":
            m = _smooth_noise_mask(rng, s)
            src = images[int(rng.integers(0, b))]
            src = np.rot90(src, k=int(rng.integers(1, 4)), axes=(1, 2))
            src = np.clip(src * rng.uniform(0.5, 1.5) + rng.uniform(-0.2, 0.2), 0, 1)
            beta = rng.uniform(0.4, 1.0)
            img[:] = img * (1 - beta * m) + beta * m * src
            masks[i] = m
        else:
            m = _scratch_mask(rng, s) if kind == "scratch" else _smooth_noise_mask(rng, s)
            shift = rng.uniform(0.15, 0.5) * (1 if rng.random() < 0.5 else -1)
            soft = F.avg_pool2d(torch.from_numpy(m)[None, None], 3, 1, 1)[0, 0].numpy()
            img[:] = np.clip(img + shift * soft[None], 0, 1)
            masks[i] = (soft > 0.3).astype(np.float32)
        if masks[i].sum() < 4:  # degenerate draw: treat as clean
            out[i] = images[i]
            masks[i] = 0.0
    return out, masks


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Nuisance augmentation a normal part may show: flips and mild brightness/contrast change."""
    out = images.copy()
    for i in range(len(out)):
        if rng.random() < 0.5:
            out[i] = out[i][:, :, ::-1]
        if rng.random() < 0.5:
            out[i] = out[i][:, ::-1, :]
        out[i] = np.clip((out[i] - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05), 0, 1)
    return out


def _random_crops(images: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """Random ``crop x crop`` windows of ``(B, 3, S, S)`` (whole images when ``crop >= S``)."""
    s = images.shape[-1]
    if crop <= 0 or crop >= s:
        return images
    out = np.empty(images.shape[:2] + (crop, crop), images.dtype)
    for i in range(len(images)):
        y, x = rng.integers(0, s - crop + 1, size=2)
        out[i] = images[i, :, y:y + crop, x:x + crop]
    return out


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal BCE + soft Dice; ``logits``/``target`` ``(B, 1, h, w)`` (defects are rare pixels)."""
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    focal = ((1 - pt) ** gamma * bce).mean()
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return focal * 10 + dice


def _seg_target(m: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """Pixel masks ``(B, 1, S, S)`` -> per-cell targets ``(B, 1, *size)`` (see ``FeatureConfig.seg_target``)."""
    mean = F.adaptive_avg_pool2d(m, size)
    if mode == "mean":
        return mean
    peak = F.adaptive_max_pool2d(m, size)
    if mode == "max":
        return peak
    if mode == "mix":
        return 0.5 * (mean + peak)
    raise ValueError(f"seg_target must be mean, max or mix, got {mode!r}")


def train_feature_net(images: np.ndarray, cfg: FeatureConfig,
                      on_step: Callable[[int, float], None] | None = None) -> FeatureNet:
    """Self-supervised training on normal images ``(N, 3, S, S)`` float32 in [0, 1]."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = FeatureNet(cfg)
    mean = images.mean(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    std = images.std(axis=(0, 2, 3)).reshape(1, 3, 1, 1) + 1e-3
    net.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    net.std.copy_(torch.from_numpy(std.astype(np.float32)))
    net = net.to(memory_format=torch.channels_last)  # NHWC convolutions: ~1.3x faster steps on CPU
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1),
                                                pct_start=0.1)
    net.train()
    n = len(images)
    for step in range(cfg.steps):
        idx = rng.choice(n, size=min(cfg.batch_size, n), replace=n < cfg.batch_size)
        batch = _augment(_random_crops(images[idx], cfg.train_crop, rng), rng)
        x, m = synthesize_defects(batch, rng)
        _, logits = net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
        target = _seg_target(torch.from_numpy(m)[:, None], logits.shape[-2:], cfg.seg_target)
        loss = focal_dice_loss(logits, target.clamp(0, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    net.eval()
    return net
