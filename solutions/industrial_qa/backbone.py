"""A user-supplied ImageNet ResNet as a frozen PatchCore feature extractor.

No ImageNet weights can be downloaded here, so the default detector learns its features
self-supervised (features.py). When a user has a checkpoint, ``--backbone PATH`` uses it instead:

* ``PATH`` is a torchvision-layout state dict (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
  ...) of ResNet-18, ResNet-34, ResNet-50 or Wide-ResNet-50-2, as ``.pth`` / ``.pt`` (read with
  ``torch.load(weights_only=True)``) or ``.safetensors``. A ``{"state_dict": ...}`` / ``{"model": ...}``
  wrapper and a ``module.`` (DataParallel) prefix are accepted.
* The architecture is detected from the keys and shapes (basic vs bottleneck blocks, blocks per stage,
  bottleneck width) and the network is built with MONAI's ``ResNet`` (its parameter names follow
  torchvision's); Wide-ResNet-50-2's doubled bottleneck width is a small block subclass.
* Only the stem and layer1-3 are kept (layer4 and fc are not used), frozen, in eval mode.

Features as in PatchCore: ImageNet mean/std normalisation (grayscale parts arrive replicated to 3
channels by the loader), layer2 (stride 8) and layer3 (stride 16) each 3x3 locally averaged, layer3
bilinearly upsampled to layer2's grid, concatenated: ``(B, C2 + C3, S/8, S/8)``, the same grid as the
self-supervised net's, so the memory bank / coreset / scoring path is shared unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import DataError

# arch -> (block kind, blocks per stage, bottleneck width multiplier)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int], int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 1),
    "resnet34": ("basic", (3, 4, 6, 3), 1),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 2),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KEPT = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
_HELP = ("expected a torchvision-layout ImageNet state dict of resnet18, resnet34, resnet50 or "
         "wide_resnet50_2 (e.g. torch.save(torchvision.models.resnet18(weights='DEFAULT').state_dict(), "
         "'resnet18.pth')) as .pth/.pt or .safetensors")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (``.pth``/``.pt``/``.safetensors``); :class:`DataError` otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"backbone checkpoint not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(p))
        elif suffix in (".pth", ".pt"):
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            raise DataError(f"backbone {p.name}: unsupported file type {suffix or '(none)'}; {_HELP}")
    except DataError:
        raise
    except Exception as e:  # truncated / corrupt / pickled objects weights_only refuses
        raise DataError(f"backbone {p.name} could not be read ({type(e).__name__}: {str(e)[:200]}); "
                        f"{_HELP}") from e
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"backbone {p.name} is not a state dict of tensors; {_HELP}")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _blocks(sd: dict[str, torch.Tensor], layer: str) -> int:
    idx = {int(k.split(".")[1]) for k in sd if k.startswith(layer + ".") and k.split(".")[1].isdigit()}
    return max(idx) + 1 if idx else 0


def detect_arch(sd: dict[str, torch.Tensor]) -> str:
    """Name in :data:`ARCHS` of the ResNet a torchvision-layout state dict belongs to."""
    w = sd.get("conv1.weight")
    if w is None or tuple(w.shape) != (64, 3, 7, 7) or "layer1.0.conv1.weight" not in sd:
        found = ", ".join(list(sd)[:4])
        raise DataError(f"backbone is not a torchvision ResNet (no 64x3x7x7 conv1.weight / layer1; "
                        f"first keys: {found}); {_HELP}")
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    layers = tuple(_blocks(sd, f"layer{i}") for i in range(1, 5))
    width = 1
    if kind == "bottleneck":
        width = int(sd["layer1.0.conv1.weight"].shape[0]) // 64
    for name, spec in ARCHS.items():
        # layer4 is not used, but a checkpoint without it is still recognised by layers 1-3
        if spec[0] == kind and spec[2] == width and spec[1][:3] == layers[:3] and layers[3] in (0, spec[1][3]):
            return name
    raise DataError(f"backbone: unsupported ResNet variant ({kind} blocks {layers}, width x{width}); {_HELP}")


def _build(arch: str) -> nn.Module:
    """MONAI ResNet (2-D, torchvision stem and 'B' shortcuts) truncated after layer3."""
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    kind, layers, width = ARCHS[arch]
    block: Any = ResNetBlock
    if kind == "bottleneck":
        block = ResNetBottleneck if width == 1 else _wide_bottleneck(width)
    net = ResNet(block, list(layers), [64, 128, 256, 512], spatial_dims=2, n_input_channels=3,
                 conv1_t_size=7, conv1_t_stride=2, no_max_pool=False, shortcut_type="B",
                 bias_downsample=False, num_classes=1)
    net.layer4 = nn.Identity()  # type: ignore[assignment]
    net.fc = None  # type: ignore[assignment]
    return net


def _wide_bottleneck(mult: int) -> type[nn.Module]:
    """torchvision's Bottleneck with ``width_per_group = 64 * mult`` (Wide-ResNet): the 1x1 / 3x3
    convolutions are ``mult`` times wider, the output stays ``planes * 4``."""
    from monai.networks.nets.resnet import ResNetBottleneck

    class WideBottleneck(ResNetBottleneck):
        def __init__(self, in_planes: int, planes: int, spatial_dims: int = 2, stride: int = 1,
                     downsample: nn.Module | None = None, **kw: object) -> None:
            super().__init__(in_planes, planes, spatial_dims, stride, downsample, **kw)  # type: ignore[arg-type]
            w = planes * mult
            self.conv1 = nn.Conv2d(in_planes, w, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(w)
            self.conv3 = nn.Conv2d(w, planes * self.expansion, 1, bias=False)

    return WideBottleneck


class BackboneNet(nn.Module):
    """Frozen ResNet stem + layer1-3 with the :class:`~solutions.industrial_qa.features.FeatureNet`
    interface: ``forward(x (B, 3, S, S) in [0, 1])`` -> (patch features ``(B, C2 + C3, S/8, S/8)``,
    a zero "segmentation" logit map ``(B, 1, S/8, S/8)``: there is no pretext head, use fusion knn)."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise DataError(f"unknown backbone architecture {arch!r}; one of {', '.join(ARCHS)}")
        self.arch = arch
        self.body = _build(arch)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @property
    def feature_dim(self) -> int:
        expansion = 4 if ARCHS[self.arch][0] == "bottleneck" else 1
        return (128 + 256) * expansion   # layer2 + layer3 output channels

    def train(self, mode: bool = True) -> BackboneNet:  # frozen: BatchNorm always uses its ImageNet statistics
        return super().train(False)

    def load_backbone(self, sd: dict[str, torch.Tensor], name: str = "backbone") -> None:
        """Copy the stem + layer1-3 tensors of a torchvision state dict; clear error on any mismatch."""
        own = self.body.state_dict()
        kept = {k: v for k, v in sd.items() if k.startswith(_KEPT)}
        missing = sorted(set(own) - set(kept))
        if missing:
            raise DataError(f"{name}: {len(missing)} {self.arch} tensors missing (e.g. {', '.join(missing[:3])}); "
                            f"{_HELP}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(kept[k].shape)]
        if bad:
            k = bad[0]
            raise DataError(f"{name}: {k} has shape {tuple(kept[k].shape)}, {self.arch} expects "
                            f"{tuple(own[k].shape)}; {_HELP}")
        self.body.load_state_dict({k: kept[k].float() for k in own})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b: Any = self.body
        x = (x - self.mean) / self.std  # type: ignore[operator]
        x = b.maxpool(b.act(b.bn1(b.conv1(x))))
        f2 = b.layer2(b.layer1(x))                                   # (B, C2, S/8, S/8)
        f3 = b.layer3(f2)                                            # (B, C3, S/16, S/16)
        f2 = F.avg_pool2d(f2, 3, 1, 1, count_include_pad=False)
        f3 = F.avg_pool2d(f3, 3, 1, 1, count_include_pad=False)
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        feats = torch.cat([f2, f3], 1)
        return feats, feats.new_zeros(feats.shape[0], 1, *feats.shape[-2:])


def load_backbone(path: str | Path) -> BackboneNet:
    """Read, recognise and load a checkpoint: a frozen :class:`BackboneNet`."""
    sd = read_state_dict(path)
    net = BackboneNet(detect_arch(sd))
    net.load_backbone(sd, Path(path).name)
    return net
