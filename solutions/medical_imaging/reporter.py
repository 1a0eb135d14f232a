"""The dual-encoder reporter: pure nn.Modules and the report vocabulary (no I/O, no training loop).

* :class:`ImageEncoder`: a MONAI ResNet trunk (2-D slices; a 3-D volume is read slice-wise by the
  pipeline) -> pooled feature -> heads for modality, body region (image + clinical history), plane,
  finding category and abnormal/normal, plus a CLIP projection into the joint image-report space.
* :class:`TextProjector`: the report side of the dual encoder: frozen all-MiniLM-L6-v2 sentence
  embeddings projected into the same space; trained with the symmetric InfoNCE (CLIP) loss.
* :class:`ReportDecoder`: a causal Transformer drafting the findings sentence, conditioned through a
  prefix of tokens: image feature, clinical history, retrieved similar prior reports, and
  modality / region / plane embeddings.

Shapes: images (B, 1, S, S) in [0, 1]; text embeddings (B, 384); tokens (B, T) int64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from solutions.medical_imaging.data import MODALITIES, PLANES, REGIONS

TEXT_DIM = 384  # all-MiniLM-L6-v2
PAD, BOS, EOS, UNK = 0, 1, 2, 3


@dataclass
class ReporterConfig:
    image_size: int = 96
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    layers: tuple[int, int, int, int] = (1, 1, 1, 1)  # basic blocks per ResNet stage
    tta: bool = True  # heads average the image and its mirror at inference
    history_dropout: float = 0.0  # dropout on the history embedding and its projection (training only)
    embed_dim: int = 128  # joint CLIP space
    categories: tuple[str, ...] = ()
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 40
    vocab: list[int] = field(default_factory=list)  # compact id -> WordPiece id (first 4 are specials)
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"], d["categories"], d["layers"] = list(self.channels), list(self.categories), list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReporterConfig:
        d = dict(d)
        d["channels"], d["categories"] = tuple(d["channels"]), tuple(d["categories"])
        d["layers"] = tuple(d.get("layers", (1, 1, 1, 1)))
        d.setdefault("tta", False)  # models saved before TTA existed
        return cls(**d)


class ImageEncoder(nn.Module):
    """MONAI ResNet-10-style trunk with classification heads and a CLIP projection."""

    def __init__(self, cfg: ReporterConfig) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.cfg = cfg

        self.trunk = ResNet(block="basic", layers=list(cfg.layers), block_inplanes=list(cfg.channels), spatial_dims=2,
                            n_input_channels=1, num_classes=0, feed_forward=False, conv1_t_stride=2)
        feat = cfg.channels[-1]
        self.feat_dim = feat
        self.history = nn.Sequential(nn.Linear(TEXT_DIM, feat), nn.GELU())
        self.modality = nn.Linear(feat, len(MODALITIES))
        self.plane = nn.Linear(feat, len(PLANES))
        self.region = nn.Sequential(nn.Linear(2 * feat, feat), nn.GELU(), nn.Dropout(cfg.dropout),
                                    nn.Linear(feat, len(REGIONS)))
        self.category = nn.Sequential(nn.Linear(2 * feat, feat), nn.GELU(), nn.Dropout(cfg.dropout),
                                      nn.Linear(feat, max(len(cfg.categories), 1)))
        self.abnormal = nn.Linear(feat, 1)
        self.proj = nn.Linear(feat, cfg.embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, F) pooled trunk features."""
        return self.trunk(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor, history: torch.Tensor) -> dict[str, torch.Tensor]:
        """``history`` (B, 384) MiniLM embedding of the clinical history (zeros when absent)."""
        f = self.features(x)  # (B, F)
        p = self.cfg.history_dropout
        h = F.dropout(self.history(F.dropout(history, p, self.training)), p, self.training)
        fh = torch.cat([f, h], dim=-1)  # (B, 2F)
        return {
            "feature": f,
            "modality": self.modality(f),
            "plane": self.plane(f),
            "region": self.region(fh),
            "category": self.category(fh),
            "abnormal": self.abnormal(f).squeeze(-1),
            "embedding": F.normalize(self.proj(f), dim=-1),  # (B, E)
        }


class TextProjector(nn.Module):
    """Report side of the dual encoder: MiniLM (frozen, precomputed) -> joint space."""

    def __init__(self, cfg: ReporterConfig) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(TEXT_DIM, TEXT_DIM), nn.GELU(), nn.Linear(TEXT_DIM, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as in CLIP

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(text_emb), dim=-1)  # (B, E)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch; ``same`` (B, B) marks pairs sharing a caption (not negatives)."""
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()  # (B, B)
    target = torch.arange(img.shape[0], device=img.device)
    if same is not None:
        logits = logits.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool, device=img.device), -1e4)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class ReportDecoder(nn.Module):
    """Prefix-conditioned causal Transformer over the compact report vocabulary.

    Prefix (B, P, D), P = 6: [image, history, retrieved reports, modality, region, plane].
    """

    N_PREFIX = 6

    def __init__(self, cfg: ReporterConfig, image_dim: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.tok = nn.Embedding(len(cfg.vocab), d, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len + self.N_PREFIX, d)
        self.img = nn.Linear(image_dim, d)
        self.hist = nn.Linear(TEXT_DIM, d)
        self.retr = nn.Linear(TEXT_DIM, d)
        self.mod = nn.Embedding(len(MODALITIES), d)
        self.reg = nn.Embedding(len(REGIONS), d)
        self.pla = nn.Embedding(len(PLANES), d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(cfg.vocab), bias=False)
        self.head.weight = self.tok.weight  # tied input/output embeddings

    def prefix(self, image: torch.Tensor, history: torch.Tensor, retrieved: torch.Tensor,
               modality: torch.Tensor, region: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """(B, P, D) conditioning tokens."""
        return torch.stack([self.img(image), self.hist(history), self.retr(retrieved),
                            self.mod(modality), self.reg(region), self.pla(plane)], dim=1)

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D), (B, T) -> logits (B, T, V) for the next token at each text position."""
        B, T = tokens.shape
        P = prefix.shape[1]
        x = torch.cat([prefix, self.tok(tokens)], dim=1)  # (B, P+T, D)
        x = x + self.pos(torch.arange(P + T, device=x.device))[None]
        # prefix-LM mask: prefix attends to itself, text attends to prefix and earlier text
        mask = torch.full((P + T, P + T), float("-inf"), device=x.device).triu(1)
        mask[:P, :P] = 0.0
        pad = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=x.device), tokens == PAD], dim=1)
        pad[:, P] = False  # BOS is never padding
        h = self.blocks(x, mask=mask, src_key_padding_mask=pad)
        return self.head(self.norm(h[:, P:]))  # (B, T, V)

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, max_new: int = 48, no_repeat_ngram: int = 3,
                 min_len: int = 6) -> list[list[int]]:
        """Greedy decoding with n-gram blocking. Returns compact token ids without specials."""
        B = prefix.shape[0]
        seqs = torch.full((B, 1), BOS, dtype=torch.long, device=prefix.device)
        done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
        for step in range(max_new):
            logits = self.forward(prefix, seqs)[:, -1].float()  # (B, V)
            logits[:, PAD] = logits[:, BOS] = logits[:, UNK] = float("-inf")
            if step < min_len:
                logits[:, EOS] = float("-inf")
            if no_repeat_ngram > 1 and seqs.shape[1] >= no_repeat_ngram:
                for b in range(B):
                    s = seqs[b].tolist()
                    ctx = tuple(s[-(no_repeat_ngram - 1):])
                    for i in range(len(s) - no_repeat_ngram + 1):
                        if tuple(s[i:i + no_repeat_ngram - 1]) == ctx:
                            logits[b, s[i + no_repeat_ngram - 1]] = float("-inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        out = []
        for row in seqs[:, 1:].tolist():
            ids = []
            for t in row:
                if t in (EOS, PAD):
                    break
                ids.append(t)
            out.append(ids)
        return out
