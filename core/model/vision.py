"""Image encoders (2-D slices/photos, 3-D volumes) and the bridge from image features to the LM.

Hybrid CNN + Transformer: a convolutional stem of MONAI ``ResidualUnit``s (strided, so local texture
and edges are captured at full resolution and the token count drops by ``2**n_stages`` per axis),
then pre-norm Transformer encoder layers over the flattened feature map with fixed sin-cos position
embeddings computed for whatever grid arrives (any input size that is a multiple of the stride).

API (tensor shapes)::

    enc = VisionEncoder2D(in_channels=1, dim=256)          # or VisionEncoder3D(...)
    out = enc(x)               # x: (B, C, H, W) or (B, C, D, H, W)
    out.tokens                 # (B, N, dim), N = prod(spatial / 2**n_stages)
    out.pooled                 # (B, dim) mean of the final tokens (for classification / retrieval)
    out.grid                   # spatial token grid, e.g. (H/16, W/16); tokens.view(B, *grid, dim) -> map

    proj = VisionProjector(vision_dim=256, lm_dim=lm.args.hidden_size, max_tokens=64)
    prefix = proj(out.tokens)                               # (B, <=64, lm_dim) LM prefix embeddings
    embeds, mask, labels = build_multimodal_inputs(lm, prefix, has_image, input_ids, attention_mask)
    loss = prefix_lm_loss(lm, prefix, has_image, input_ids, attention_mask)

Modality-aware masking: rows without an image (``has_image[b] == False``) get attention mask 0 on the
prefix positions, so text-only inputs never attend to (zero) image slots; labels are -100 there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from torch import nn

from core.errors import DataError
from core.model.deepseek import DeepseekV3


def sincos_position_embedding(grid: tuple[int, ...], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed sin-cos embedding for an n-D grid -> (prod(grid), dim); each axis gets an equal share of dim."""
    n = len(grid)
    per = (dim // n) // 2 * 2  # even share per axis
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32, device=device) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        omega = 1.0 / (10000 ** (torch.arange(per // 2, dtype=torch.float32, device=device) / max(per // 2, 1)))
        ang = c.reshape(-1, 1) * omega  # (N, per/2)
        parts += [ang.sin(), ang.cos()]
    pe = torch.cat(parts, dim=1)
    return F.pad(pe, (0, dim - pe.shape[1]))


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # (B, N, dim)
    pooled: torch.Tensor  # (B, dim)
    grid: tuple[int, ...]  # token grid per spatial axis


class VisionEncoder(nn.Module):
    """Hybrid CNN + Transformer encoder for ``spatial_dims`` = 2 (slices, photos) or 3 (volumes)."""

    def __init__(self, spatial_dims: int, in_channels: int, dim: int = 256, *, stem_channels: tuple[int, ...] = (32, 64, 128),
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if dim % heads:
            raise DataError(f"dim={dim} must be divisible by heads={heads}")
        self.spatial_dims, self.in_channels, self.dim = spatial_dims, in_channels, dim
        chans = (in_channels, *stem_channels, dim)
        # Each stage halves every spatial axis: stride 2 ** (len(stem_channels) + 1) in total.
        self.stem = nn.Sequential(*[
            ResidualUnit(spatial_dims, chans[i], chans[i + 1], strides=2, kernel_size=3, subunits=2,
                         act="GELU", norm="INSTANCE" if spatial_dims == 3 else "BATCH")
            for i in range(len(chans) - 1)])
        self.stride = 2 ** (len(chans) - 1)
        # Pre-norm Transformer layers (torch's own; MONAI's TransformerBlock needs einops).
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> VisionOutput:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            want = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise DataError(f"expected images {want} with C={self.in_channels}, got {tuple(x.shape)}")
        if any(s < self.stride for s in x.shape[2:]):
            raise DataError(f"image too small: every side must be >= {self.stride} px, got {tuple(x.shape[2:])}")
        f = self.stem(x)  # (B, dim, *grid)
        grid = tuple(f.shape[2:])
        t = f.flatten(2).transpose(1, 2)  # (B, N, dim)
        t = t + sincos_position_embedding(grid, self.dim, t.device).to(t.dtype)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return VisionOutput(tokens=t, pooled=t.mean(1), grid=grid)


class VisionEncoder2D(VisionEncoder):
    """2-D slices and photos: x (B, C, H, W) -> tokens (B, H/16 * W/16, dim) with the default stem."""

    def __init__(self, in_channels: int = 1, dim: int = 256, **kw: object) -> None:
        super().__init__(2, in_channels, dim, **kw)  # type: ignore[arg-type]


class VisionEncoder3D(VisionEncoder):
    """3-D volumes: x (B, C, D, H, W) -> tokens (B, D/16 * H/16 * W/16, dim) with the default stem."""

    def __init__(self, in_channels: int = 1, dim: int = 256, **kw: object) -> None:
        super().__init__(3, in_channels, dim, **kw)  # type: ignore[arg-type]


class VisionProjector(nn.Module):
    """Image tokens (B, N, vision_dim) -> LM prefix embeddings (B, M, lm_dim), M = min(N, max_tokens).

    Tokens beyond ``max_tokens`` are average-pooled (1-D adaptive pooling over the token sequence) so a
    large image or volume costs at most ``max_tokens`` LM positions; a 2-layer GELU MLP maps the width.
    """

    def __init__(self, vision_dim: int, lm_dim: int, max_tokens: int = 64) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.mlp = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.max_tokens:
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.max_tokens).transpose(1, 2)
        return self.mlp(tokens)


def build_multimodal_inputs(lm: DeepseekV3, prefix: torch.Tensor, has_image: torch.Tensor, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[image prefix | text] embeddings with a modality-aware attention mask.

    prefix (B, M, D); has_image (B,) bool; input_ids (B, T); attention_mask (B, T) or None.
    Returns embeds (B, M+T, D), attention_mask (B, M+T) (prefix positions 0 where no image), and
    labels (B, M+T) (-100 on the prefix and on text padding).
    """
    B, T = input_ids.shape
    if prefix.shape[0] != B or has_image.shape != (B,):
        raise DataError("prefix, has_image and input_ids must share the batch size")
    text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    img_mask = has_image.to(text_mask.dtype)[:, None].expand(B, prefix.shape[1])
    prefix = prefix * has_image.to(prefix.dtype)[:, None, None]  # zero slots carry no signal
    embeds = torch.cat([prefix, lm.model.embed_tokens(input_ids)], dim=1)
    mask = torch.cat([img_mask, text_mask], dim=1)
    labels = torch.cat([torch.full_like(img_mask, -100).long(),
                        input_ids.masked_fill(text_mask == 0, -100)], dim=1)
    return embeds, mask, labels


def prefix_lm_loss(lm: DeepseekV3, prefix: torch.Tensor, has_image: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token loss on the text conditioned on the image prefix (e.g. report generation)."""
    embeds, mask, labels = build_multimodal_inputs(lm, prefix, has_image, input_ids, attention_mask)
    logits = lm(inputs_embeds=embeds, attention_mask=mask)
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def count_tokens_for(shape: tuple[int, ...], stride: int = 16) -> int:
    """Tokens an encoder with ``stride`` produces for a spatial ``shape`` (for sizing prompts)."""
    return math.prod(s // stride for s in shape)
