"""User-supplied ImageNet ResNet backbone (--backbone): loading, architecture detection, features,
end-to-end fit/score/save/load, CLI, and clear errors for bad checkpoints. Randomly initialised
weights stand in for ImageNet ones (none can be downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import DataError
from solutions.industrial_qa.backbone import ARCHS, BackboneNet, detect_arch, load_backbone, read_state_dict


def _torchvision_layout(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full torchvision-layout state dict (layer4 + fc included, as torchvision saves it)."""
    torch.manual_seed(seed)
    from monai.networks.nets import ResNet

    net = BackboneNet(arch)
    sd = dict(net.body.state_dict())
    for k, v in list(sd.items()):   # non-trivial BN statistics, so loading them matters
        if k.endswith("running_var"):
            sd[k] = v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean"):
            sd[k] = v.normal_(0, 0.1)
    kind, layers, _ = ARCHS[arch]
    if kind == "basic":  # layer4 + fc as torchvision has them (ignored by the loader)
        full = ResNet("basic", list(layers), [64, 128, 256, 512], spatial_dims=2, n_input_channels=3,
                      conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=False,
                      num_classes=1000).state_dict()
        sd |= {k: v for k, v in full.items() if k.startswith(("layer4.", "fc."))}
    return sd


@pytest.fixture(scope="module")
def r18_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("r18")
    sd = _torchvision_layout("resnet18")
    torch.save(sd, d / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "resnet18.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "wrapped.pt")
    return {"pth": d / "resnet18.pth", "safetensors": d / "resnet18.safetensors", "wrapped": d / "wrapped.pt"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_is_detected_from_keys_and_shapes(arch: str) -> None:
    sd = BackboneNet(arch).body.state_dict()
    assert detect_arch(dict(sd)) == arch


def test_resnet18_loads_from_pth_safetensors_and_wrapped_checkpoints(r18_files: dict[str, Path]) -> None:
    ref = read_state_dict(r18_files["pth"])
    assert "fc.weight" in ref and "layer4.1.conv2.weight" in ref
    outs = []
    x = torch.rand(2, 3, 64, 64)
    for f in r18_files.values():
        net = load_backbone(f)
        assert net.arch == "resnet18" and not net.training
        assert all(not p.requires_grad for p in net.parameters())
        sd = net.body.state_dict()
        assert torch.equal(sd["layer3.1.bn2.running_var"], ref["layer3.1.bn2.running_var"])
        with torch.inference_mode():
            feats, logits = net(x)
        # layer2 (128) + layer3 (256) channels at stride 8
        assert feats.shape == (2, 384, 8, 8) and net.feature_dim == 384
        assert logits.shape == (2, 1, 8, 8) and not logits.any()
        outs.append(feats)
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])
    net.train()
    assert not net.training  # frozen: BatchNorm keeps the checkpoint's statistics


def test_features_follow_the_patchcore_recipe(r18_files: dict[str, Path]) -> None:
    import torch.nn.functional as F

    net = load_backbone(r18_files["pth"])
    b = net.body
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        feats, _ = net(x)
        z = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        f2 = b.layer2(b.layer1(b.maxpool(b.act(b.bn1(b.conv1(z))))))
        f3 = F.avg_pool2d(b.layer3(f2), 3, 1, 1, count_include_pad=False)
        f3 = F.interpolate(f3, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(feats[:, :128], F.avg_pool2d(f2, 3, 1, 1, count_include_pad=False), atol=1e-5)
    assert torch.allclose(feats[:, 128:], f3, atol=1e-5)


def test_bad_checkpoints_give_clear_errors(r18_files: dict[str, Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(r18_files["pth"].read_bytes()[:2000])
    with pytest.raises(DataError, match="could not be read"):
        read_state_dict(corrupt)
    with pytest.raises(DataError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_state_dict(tmp_path / "w.onnx")
    vit = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16), "cls_token": torch.zeros(1, 1, 768)}, vit)
    with pytest.raises(DataError, match="not a torchvision ResNet"):
        load_backbone(vit)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], notdict)
    with pytest.raises(DataError, match="not a state dict"):
        load_backbone(notdict)
    sd = read_state_dict(r18_files["pth"])
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}, partial)
    with pytest.raises(DataError, match="1 resnet18 tensors missing"):
        load_backbone(partial)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd | {"layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1)}, wrong)
    with pytest.raises(DataError, match="layer2.0.conv2.weight has shape"):
        load_backbone(wrong)
    odd = tmp_path / "odd.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer2.1.")}, odd)  # 1 block in layer2
    with pytest.raises(DataError, match="unsupported ResNet variant"):
        load_backbone(odd)


def test_fit_score_save_load_end_to_end(r18_files: dict[str, Path], iqa_src: Path, tmp_path: Path) -> None:
    from PIL import Image

    from solutions.industrial_qa.detector import AnomalyDetector, DetectorConfig

    cfg = DetectorConfig.tiny().use_backbone(r18_files["safetensors"])
    assert cfg.fusion == "knn" and cfg.features.backbone_arch == "resnet18"
    paths = sorted((iqa_src / "train" / "good").iterdir())[:12]
    stages: list[str] = []
    det = AnomalyDetector(cfg).fit(paths, lambda stage, frac: stages.append(stage))
    assert "self-supervised training" not in stages and "loading backbone" in stages
    assert isinstance(det.net, BackboneNet)
    assert det.memory is not None and det.memory.shape[-1] == cfg.bank_dim
    src = Image.open(paths[0]).convert("L")
    odd = tmp_path / "odd.png"
    src.resize((90, 70)).save(odd)
    res = det.inspect_images([odd, paths[1]])
    assert res[0].heatmap.shape == (70, 90)
    assert res[1].heatmap.shape == np.asarray(Image.open(paths[1])).shape[:2]
    assert all(np.isfinite(r.score) and 0 <= r.probability <= 1 for r in res)
    folder = det.save(tmp_path / "m")
    meta = json.loads((folder / "detector.json").read_text())
    assert meta["config"]["features"]["backbone_arch"] == "resnet18"
    back = AnomalyDetector.load(folder)  # self-contained: the checkpoint file is not needed any more
    assert isinstance(back.net, BackboneNet)
    again = back.inspect_images([odd, paths[1]])
    assert [r.score for r in again] == pytest.approx([r.score for r in res], rel=1e-4, abs=1e-4)


def test_cli_backbone_option(r18_files: dict[str, Path], tiny_mvtec: Path, tmp_path: Path, _cli) -> None:  # noqa: ANN001
    tiny = ["--size", "64", "--coreset", "64"]
    r = _cli("evaluate", "--data", str(tiny_mvtec), "--json", "--no-speed", "--backbone", str(r18_files["pth"]),
             *tiny, home=tmp_path / "h")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= report["image_auroc"] <= 1.0
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    r = _cli("train", "--data", str(tiny_mvtec), "--line", "l1", "--backbone", str(bad), *tiny, home=tmp_path / "h")
    assert r.returncode != 0
    assert "could not be read" in (r.stdout + r.stderr) and "Traceback" not in r.stderr
    r = _cli("evaluate", "--data", str(tiny_mvtec), "--backbone", str(r18_files["pth"]), "--fusion", "seg",
             home=tmp_path / "h")
    assert r.returncode == 2 and "with --backbone use knn" in r.stderr


def test_console_training_request_is_checked_before_queueing(r18_files: dict[str, Path], tiny_mvtec: Path,
                                                              tmp_path: Path) -> None:
    from solutions.industrial_qa.console.common import training_request_problem

    assert training_request_problem(str(tiny_mvtec)) is None
    assert training_request_problem(str(tiny_mvtec), str(r18_files["safetensors"])) is None
    missing = training_request_problem(str(tmp_path / "no-such-line"))
    assert missing and "data folder not found" in missing and "no-such-line" in missing
    notes = tmp_path / "weights.txt"
    notes.write_text("not a checkpoint")
    bad = training_request_problem(str(tiny_mvtec), str(notes))
    assert bad and bad.startswith("backbone checkpoint not usable") and "weights.txt" in bad
    gone = training_request_problem(str(tiny_mvtec), str(tmp_path / "gone.pth"))
    assert gone and "not found" in gone
