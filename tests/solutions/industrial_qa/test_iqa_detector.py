"""Detector behaviour: heatmap shape/alignment, calibration, thresholds, metrics, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import DataError, ModelNotReady
from solutions.industrial_qa import metrics
from solutions.industrial_qa.calibration import Calibrator, false_alarm_rate, threshold_for_false_alarm_rate
from solutions.industrial_qa.data import few_shot_split, load_mvtec, read_image, to_tensor_array
from solutions.industrial_qa.detector import AnomalyDetector, block_cells


def test_heatmap_at_input_resolution_for_any_size_and_mode(tiny_detector, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h, mode) in enumerate([(300, 200, "L"), (97, 311, "RGB"), (64, 64, "RGBA")]):
        arr = (rng.random((h, w, len(mode) if mode != "L" else 1)) * 255).astype(np.uint8).squeeze()
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr, mode=mode).save(p)
        files.append((p, h, w))
    results = tiny_detector.inspect_images([p for p, _, _ in files])
    for (_, h, w), r in zip(files, results, strict=True):
        assert r.heatmap.shape == (h, w)
        assert np.isfinite(r.heatmap).all() and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
        assert 0.0 <= r.probability <= 1.0
        assert r.reject == (r.score > tiny_detector.calibrator.threshold)


def test_heatmap_is_aligned_with_a_planted_defect(tiny_detector, iqa_src: Path, tmp_path: Path) -> None:
    """A dark square planted in the lower-right of a normal (non-square) part lights up there."""
    good = sorted((iqa_src / "test" / "good").iterdir())[0]
    im = np.asarray(read_image(good)).copy()
    h, w = im.shape[:2]
    y0, x0 = int(h * 0.65), int(w * 0.65)
    im[y0:y0 + h // 5, x0:x0 + w // 5] = 0
    p = tmp_path / "planted.png"
    Image.fromarray(im).save(p)
    heat = tiny_detector.inspect_images([p])[0].heatmap
    assert heat.shape == (h, w)
    yy, xx = np.unravel_index(np.argmax(heat), heat.shape)
    assert yy > h * 0.5 and xx > w * 0.5, f"peak at {(yy, xx)} not near the defect at {(y0, x0)}"
    inside = heat[y0:y0 + h // 5, x0:x0 + w // 5].mean()
    assert inside > np.median(heat)


def test_save_and_load_round_trip(tiny_detector, iqa_src: Path, tmp_path: Path) -> None:
    tiny_detector.save(tmp_path / "m")
    det2 = AnomalyDetector.load(tmp_path / "m")
    p = sorted((iqa_src / "test" / "good").iterdir())[:2]
    a = tiny_detector.inspect_images(p)
    b = det2.inspect_images(p)
    assert [r.score for r in a] == pytest.approx([r.score for r in b], rel=1e-5)
    with pytest.raises(ModelNotReady):
        AnomalyDetector.load(tmp_path / "missing")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=5, max_size=200), st.lists(st.floats(-2, 8), min_size=0, max_size=50))
def test_calibration_is_monotone_and_centred(normal: list[float], defect: list[float]) -> None:
    cal = Calibrator.fit(np.array(normal), np.array(defect) if defect else None, target_far=0.05)
    grid = np.linspace(-10, 10, 101)
    p = cal.probability(grid)
    assert np.all(np.diff(p) >= 0)
    assert np.all((p >= 0) & (p <= 1))
    if not defect:
        assert cal.probability(cal.threshold) == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 2000), st.sampled_from([0.01, 0.05, 0.1, 0.2]), st.integers(0, 10_000))
def test_threshold_respects_the_false_alarm_target(n: int, far: float, seed: int) -> None:
    scores = np.random.default_rng(seed).normal(size=n)
    thr = threshold_for_false_alarm_rate(scores, far)
    assert false_alarm_rate(scores, thr) <= far
    # new normals from the same distribution: the conformal bound holds on average; the FAR of an
    # order-statistic threshold is Beta(n + 1 - k, k) distributed (k = its rank), so check its mean and
    # a 1e-6 upper quantile (+ Monte-Carlo slack for the 20,000 fresh draws; with 1e-4 hypothesis found
    # a legitimate 1-in-10,000 draw: n=20, far=0.2, seed=1021 gives 0.603 > 0.590)
    from scipy.stats import beta

    k = min(int(np.ceil((n + 1) * (1 - far))), n)
    assert (n + 1 - k) / (n + 1) <= far or k == n
    fresh = np.random.default_rng(seed + 1).normal(size=20_000)
    assert false_alarm_rate(fresh, thr) <= beta.ppf(1 - 1e-6, n + 1 - k, k) + 0.01


def test_threshold_rejects_bad_targets() -> None:
    with pytest.raises(DataError):
        threshold_for_false_alarm_rate(np.ones(5), 0.0)
    with pytest.raises(DataError):
        threshold_for_false_alarm_rate(np.array([]), 0.1)


def test_metrics_on_known_cases() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert metrics.image_auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    assert metrics.false_alarm_rate_at_recall(np.array([0.1, 0.2, 0.85, 0.8, 0.9]), labels) == pytest.approx(1 / 3)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[1, 5:10, 5:10] = 1
    masks[1, 20:30, 20:30] = 1
    perfect = masks.astype(np.float32)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-6)
    assert metrics.pixel_auroc(perfect, masks) == 1.0
    # a map that finds only one of the two regions gets roughly half the per-region overlap
    half = np.zeros_like(perfect)
    half[1, 5:10, 5:10] = 1
    assert 0.4 < metrics.aupro(half, masks) < 0.7


def test_bad_images_raise_clear_data_errors(tmp_path: Path) -> None:
    txt = tmp_path / "notes.png"
    txt.write_text("this is not an image")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(txt)
    trunc = tmp_path / "trunc.jpg"
    Image.new("RGB", (200, 200), "gray").save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:100])
    with pytest.raises(DataError):
        read_image(trunc)
    big = tmp_path / "big.png"
    Image.new("L", (8000, 6000)).save(big)
    with pytest.raises(DataError, match="pixels"):
        read_image(big)
    tiny = tmp_path / "tiny.png"
    Image.new("L", (4, 4)).save(tiny)
    with pytest.raises(DataError, match="at least"):
        read_image(tiny)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_image(empty)


def test_loader_errors_and_few_shot_split(tiny_mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_mvtec(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="MVTec layout"):
        load_mvtec(tmp_path / "flat")
    ds = load_mvtec(tiny_mvtec)
    assert ds.has_masks and ds.defect_types == ["blowhole", "crack", "uneven"]
    shots, rest = few_shot_split(ds.test, 4, seed=1)
    assert len(shots) == 4 and {s.defect_type for s in shots} == {"blowhole", "crack", "uneven"}
    assert not {s.path for s in shots} & {s.path for s in rest}
    assert sum(s.label == 0 for s in rest) == 6
    assert [s.path for s in few_shot_split(ds.test, 4, seed=1)[0]] == [s.path for s in shots]
    with pytest.raises(DataError):
        few_shot_split(ds.test, 9)


def _synthetic_raw_detector(maps: torch.Tensor, norm: str = "position") -> AnomalyDetector:
    """A detector whose ``_raw`` returns ``maps[i]`` (knn) and zeros (seg) for an image filled with ``i``."""
    from solutions.industrial_qa.detector import DetectorConfig

    det = AnomalyDetector(DetectorConfig(fusion="knn", norm=norm, blur_sigma=0.0, batch_size=4))

    def raw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = maps[x[:, 0, 0, 0].round().long()]
        return torch.zeros(len(x), 1, *k.shape[-2:]), k, torch.zeros_like(k)

    det._raw = raw  # type: ignore[method-assign]
    return det


def test_position_normalisation_suppresses_fixed_structures_with_leave_one_out_calibration() -> None:
    g = torch.Generator().manual_seed(0)
    n, h = 10, 8
    maps = torch.rand(n + 1, h, h, generator=g)
    maps[:, 0, :] += 5.0                     # a bright but normal border row on every part
    maps[n, 4, 4] += 2.5                     # the one defect, weaker than the border
    x = np.broadcast_to(np.arange(n + 1, dtype=np.float32)[:, None, None, None], (n + 1, 3, h, h)).copy()
    det = _synthetic_raw_detector(maps)
    loo = det._fit_normalisation(x[:n])
    glob = _synthetic_raw_detector(maps, norm="global")
    glob._fit_normalisation(x[:n])
    # global z-scores put the maximum on the border row; per-position z-scores on the defect
    assert int(glob.fuse(maps[n:, :, :], maps[n:]).flatten().argmax()) // h == 0
    assert int(det.fuse(maps[n:], maps[n:]).flatten().argmax()) == 4 * h + 4
    # each held-out score uses statistics without that image: same as refitting on the other n - 1
    # (up to the std floor, which uses all n), and clearly above the score with its own map included
    for i in (0, 7):
        others = _synthetic_raw_detector(maps)
        others._fit_normalisation(x[[j for j in range(n) if j != i]])
        assert loo[i] == pytest.approx(float(others.fuse(maps[i:i + 1], maps[i:i + 1]).max()), rel=1e-3)
        assert loo[i] > 1.05 * float(det.fuse(maps[i:i + 1], maps[i:i + 1]).max())


def test_median_background_ignores_part_wide_offsets_but_keeps_local_defects() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(12, 8, 8, generator=g)
    x = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None, None], (10, 3, 8, 8)).copy()
    det = _synthetic_raw_detector(maps)
    det.config.background = "median"
    det._fit_normalisation(x)
    base = maps[10:11]
    shifted, local = base + 3.0 * det.pos_stats[1], base.clone()   # +3 z everywhere
    local[0, 2:4, 2:4] += 3.0 * det.pos_stats[1, 2:4, 2:4]
    s_base, s_shift, s_local = (float(det.fuse(m, m).max()) for m in (base, shifted, local))
    assert s_shift == pytest.approx(s_base, abs=1e-4)
    assert s_local > s_base + 1.0
    det.config.background = "none"
    assert float(det.fuse(shifted, shifted).max()) == pytest.approx(float(det.fuse(base, base).max()) + 3.0, abs=1e-4)


def test_clipped_background_removes_normal_offsets_and_keeps_the_excess_of_an_elevated_part() -> None:
    """``background="clip"`` (the default): the subtracted part median is capped at the 95th percentile
    of the held-out normals' leave-one-out medians, fitted before their calibration scores; a part
    elevated by less than that scores as with the plain median, one elevated far beyond it keeps the
    excess (the plain median cancels it completely)."""
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(12, 8, 8, generator=g)
    x = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None, None], (10, 3, 8, 8)).copy()
    det = _synthetic_raw_detector(maps)
    assert det.config.background == "clip"
    hold_scores = det._fit_normalisation(x)
    cap = det.stats["bg_cap"]
    assert 0.0 < cap < 3.0
    base = maps[10:11]
    small, big = base + 0.01 * det.pos_stats[1], base + 8.0 * det.pos_stats[1]  # +0.01 / +8 z everywhere
    s_base, s_small, s_big = (float(det.fuse(m, m).max()) for m in (base, small, big))
    assert s_small == pytest.approx(s_base, abs=0.05)
    assert s_big > s_base + 6.0                                    # the excess over the cap stays
    det.config.background = "median"
    assert float(det.fuse(big, big).max()) == pytest.approx(s_base, abs=1e-3)
    det.config.background = "clip"
    # the calibration scores were computed with the cap (refit: same cap, same scores)
    assert np.allclose(det._fit_normalisation(x), hold_scores) and det.stats["bg_cap"] == pytest.approx(cap)


def test_pca_memory_bank_is_an_orthonormal_projection_of_the_features(tiny_detector, iqa_src: Path) -> None:
    """The bank lives in a ``bank_dim`` PCA space (cheaper kNN); distances there never exceed the
    full-feature distances (orthonormal projection), and the stride-8 kNN map uses that space."""
    det = tiny_detector
    p = det.bank_proj
    assert p is not None and det.memory.shape[-1] == det.config.bank_dim == p.shape[1]
    assert torch.allclose(p.T @ p, torch.eye(p.shape[1]), atol=1e-4)
    x = torch.from_numpy(np.stack([read_image(f).convert("RGB").resize((64, 64)) for f in
                                   sorted((iqa_src / "test" / "good").iterdir())[:2]]).astype(np.float32) / 255)
    feats, knn, _ = det._raw(x.permute(0, 3, 1, 2).contiguous())
    q = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    proj = ((q - det.bank_mean) @ p).view(2, -1, p.shape[1])                 # (2, h*w, p)
    tiles = block_cells(*knn.shape[-2:], det.config.local_block)            # per-position bank: one per tile
    assert det.memory.shape[:2] == (len(tiles), det.config.local_bank)
    expect = torch.empty(proj.shape[:2])
    for k, cells in enumerate(tiles):
        expect[:, cells] = torch.cdist(proj[:, cells].reshape(-1, p.shape[1]), det.memory[k]).min(1).values.view(2, -1)
    assert torch.allclose(knn, expect.view_as(knn), atol=1e-3)
    a, b = q[:5], q[5:10]
    assert (torch.cdist((a - det.bank_mean) @ p, (b - det.bank_mean) @ p) <= torch.cdist(a, b) + 1e-4).all()


def _two_texture_parts(in_a: torch.Tensor, odd_cell: int, h: int = 8, w: int = 8
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch features (n, h*w, 8) of synthetic parts with texture A on the grid cells ``in_a`` (h*w,) marks
    and texture B elsewhere (|a - b| = 4.2, noise 0.1): 20 normal parts to fit, one part with a B patch at
    ``odd_cell`` (an A cell), one more normal part."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 3.0, 3.0

    def parts(n: int) -> torch.Tensor:
        return torch.where(in_a[None, :, None], a, b) + 0.1 * torch.randn(n, h * w, 8, generator=g)

    odd = parts(1)
    odd[0, odd_cell] = b + 0.1 * torch.randn(8, generator=g)
    ok = parts(1)
    return parts(20), odd, ok


def test_per_position_bank_flags_a_patch_that_is_normal_only_elsewhere_on_the_part() -> None:
    """Normal parts carry texture A in the top half of the grid and B in the bottom half. A B patch in
    the top half is far from every patch of its tile's bank but close to the one global bank; normal
    patches are close to both."""
    from solutions.industrial_qa.detector import DetectorConfig

    h = w = 8
    cell = 1 * w + 2                                                          # B texture at (1, 2)
    fit, odd, ok = _two_texture_parts(torch.arange(h * w) // w < h // 2, cell)
    dists = {}
    for block in (0, 4):
        det = AnomalyDetector(DetectorConfig(bank_dim=0, coreset_size=256, local_block=block, local_radius=0,
                                             local_bank=128))
        det._fit_patch_bank(fit, h, w)
        assert det.memory.dim() == (3 if block else 2)
        dists[block] = (det._knn(odd, h, w)[0, cell], det._knn(ok, h, w)[0].max())
    (g_odd, g_ok), (l_odd, l_ok) = dists[0], dists[4]
    assert float(g_odd) < 1.0 and float(g_ok) < 1.0 and float(l_ok) < 1.0   # normal everywhere / here
    assert float(l_odd) > 3.0                                                 # ~|a - b| = 4.2 from its tile's bank


def test_default_tile_bank_searches_only_its_own_cells() -> None:
    """Default ``local_radius`` 0: a tile's bank holds only its own cells' fit patches. Normal parts
    carry texture A in grid columns 0-3 (the first tile column) and B in columns 4-7; a B patch in
    column 3 is far from its tile's bank at radius 0, but close at radius 2 (the widened tile
    reaches columns 4-5); normal patches are close at both radii."""
    from solutions.industrial_qa.detector import DetectorConfig

    assert DetectorConfig().local_radius == 0 and DetectorConfig().local_block == 4
    h = w = 8
    cell = 2 * w + 3                                                          # B texture at (2, 3)
    fit, odd, ok = _two_texture_parts(torch.arange(h * w) % w < 4, cell)
    dists = {}
    for radius in (0, 2):
        det = AnomalyDetector(DetectorConfig(bank_dim=0, local_radius=radius, local_bank=128))
        det._fit_patch_bank(fit, h, w)
        assert det.memory.shape[0] == 4                                      # 2 x 2 tiles of 4 x 4 cells
        dists[radius] = (det._knn(odd, h, w)[0, cell], det._knn(ok, h, w)[0].max())
    (r0_odd, r0_ok), (r2_odd, r2_ok) = dists[0], dists[2]
    assert float(r0_ok) < 1.0 and float(r2_ok) < 1.0 and float(r2_odd) < 1.0
    assert float(r0_odd) > 3.0                                                # ~|a - b| = 4.2


@pytest.mark.parametrize("sigma", [0.0, 1.0, 4.0])
def test_matrix_upsample_equals_interpolate_then_blur(sigma: float) -> None:
    """The fast map upsampling (two small matmuls) is the same linear map as bilinear + Gaussian blur."""
    import torch.nn.functional as F

    from solutions.industrial_qa.detector import DetectorConfig, gaussian_blur

    det = AnomalyDetector(DetectorConfig(blur_sigma=sigma))
    small = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    ref = gaussian_blur(F.interpolate(small[:, None], size=(64, 64), mode="bilinear", align_corners=False), sigma)
    out = det.upsample(small, 64)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, ref[:, 0], atol=1e-5)
    assert int(out.flatten(1).argmax(1)[0]) == int(ref[:, 0].flatten(1).argmax(1)[0])


def test_coarse_branch_flags_a_large_texture_change_that_each_patch_alone_does_not() -> None:
    """Region (mean, std) descriptors see a quarter of the part whose features vary 3x more, though
    every single patch there is a plausible normal value; the map peaks in that quarter."""
    from solutions.industrial_qa.detector import DetectorConfig

    g = torch.Generator().manual_seed(0)
    det = AnomalyDetector(DetectorConfig(coarse_grid=4, coarse_bank=128, bank_dim=8))
    normal = torch.randn(40, 16, 16, 16, generator=g)                # (n, D, h, w) patch features
    det._fit_coarse_bank(det._regions(normal[:30]).permute(0, 2, 3, 1).reshape(-1, 32))
    assert det.coarse_memory is not None and det.coarse_memory.shape == (128, 8)
    hold = det._coarse_raw(normal[30:])                              # (10, 4, 4)
    _, mu, sd = det._loo_z(hold, 0.25 * float(hold.std(0).mean()))
    det.coarse_stats = torch.stack([mu, sd])
    part = torch.randn(1, 16, 16, 16, generator=g)
    part[:, :, 8:, 8:] = (part[:, :, 8:, 8:] * 3).clamp(-3, 3)       # no value outside the normal range
    cmap = det.coarse_map(part)
    assert cmap.shape == (1, 16, 16)
    assert float(cmap[0, 8:, 8:].mean()) > float(cmap[0, :8, :8].mean()) + 2.0
    assert int(cmap[0].flatten().argmax()) // 16 >= 8
    ok = det.coarse_map(torch.randn(1, 16, 16, 16, generator=g))
    assert float(ok.max()) < float(cmap.max())


def test_coarse_map_keeps_a_texture_change_over_most_of_the_part_without_median_subtraction(
        tiny_detector, tmp_path: Path) -> None:
    """``coarse_background="none"`` (the default): a texture change over three quarters of the part is
    not cancelled by the part's own median, so those regions stay above a new normal part's map;
    with ``"median"`` (models saved before the option) they sit at the part's median level."""
    from solutions.industrial_qa.detector import DetectorConfig

    g = torch.Generator().manual_seed(0)
    det = AnomalyDetector(DetectorConfig(coarse_grid=4, coarse_bank=128, bank_dim=8))
    assert det.config.coarse_background == "none"
    normal = torch.randn(40, 16, 16, 16, generator=g)                # (n, D, h, w) patch features
    det._fit_coarse_bank(det._regions(normal[:30]).permute(0, 2, 3, 1).reshape(-1, 32))
    hold = det._coarse_raw(normal[30:])
    _, mu, sd = det._loo_z(hold, 0.25 * float(hold.std(0).mean()))
    det.coarse_stats = torch.stack([mu, sd])
    part = torch.randn(1, 16, 16, 16, generator=g)
    changed = torch.ones(16, 16, dtype=torch.bool)
    changed[:8, :8] = False                                          # 3/4 of the part
    part[:, :, changed] = (part[:, :, changed] * 3).clamp(-3, 3)
    ok = det.coarse_map(torch.randn(1, 16, 16, 16, generator=g))
    cmap = det.coarse_map(part)
    assert float(cmap[0, 12:, 12:].min()) > float(ok.max())
    det.config.coarse_background = "median"
    med = det.coarse_map(part)
    assert float(med[0, 12:, 12:].mean()) < float(cmap[0, 12:, 12:].mean()) - 1.0
    assert float(med[0, :4, :4].max()) < float(ok.min())           # the unchanged quarter pushed below normal
    # models saved before the option keep the median subtraction (and score as they did)
    meta_path = tiny_detector.save(tmp_path / "m") / "detector.json"
    meta = json.loads(meta_path.read_text())
    assert meta["config"]["coarse_background"] == "none"
    del meta["config"]["coarse_background"]
    meta_path.write_text(json.dumps(meta))
    assert AnomalyDetector.load(tmp_path / "m").config.coarse_background == "median"


def _with_and_without(det: AnomalyDetector, iqa_src: Path, weight: str) -> tuple[np.ndarray, object, object]:
    """Two "uneven" test parts, scored as configured and with the config field ``weight`` set to 0."""
    x = np.stack([to_tensor_array(read_image(p), 64) for p in sorted((iqa_src / "test" / "uneven").iterdir())[:2]])
    out, kept = det.score_arrays(x), getattr(det.config, weight)
    try:
        setattr(det.config, weight, 0.0)
        without = det.score_arrays(x)
    finally:
        setattr(det.config, weight, kept)
    return x, out, without


def test_coarse_branch_is_saved_and_used_in_scores(tiny_detector, iqa_src: Path, tmp_path: Path) -> None:
    det = tiny_detector
    assert det.coarse_memory is not None and det.coarse_stats is not None
    x, out, without = _with_and_without(det, iqa_src, "coarse_weight")
    assert out.coarse is not None and out.coarse.shape == out.knn.shape
    assert not np.allclose(out.maps, without.maps)
    again = AnomalyDetector.load(det.save(tmp_path / "m")).score_arrays(x)
    assert np.allclose(again.maps, out.maps, atol=1e-4)


def test_part_level_branch_shifts_the_whole_map_of_a_part_whose_overall_texture_is_off() -> None:
    """The part descriptor (mean, std of all patch features) sees a part whose features all vary 1.6x
    more, though every patch stays in the normal range: its whole map goes up by one uniform amount,
    more than a new normal part's."""
    from solutions.industrial_qa.detector import DetectorConfig

    g = torch.Generator().manual_seed(0)
    det = AnomalyDetector(DetectorConfig(coarse_grid=0, global_dim=8, global_weight=0.5))
    normal = torch.randn(40, 16, 8, 8, generator=g)                  # (n, D, h, w) patch features
    det.part_mean, det.part_proj, det.part_memory = det._pca_bank(det._regions(normal[:30], 1).flatten(1), 8, 30)
    assert det.part_memory.shape == (30, 8)
    hold = det._part_raw(normal[30:])                                # (10,)
    _, mu, sd = det._loo_z(hold)
    det.part_stats = torch.stack([mu, sd, torch.tensor(2.0)])        # spread 2: the map shift is 0.5 * 2 * z
    off = (torch.randn(1, 16, 8, 8, generator=g) * 1.6).clamp(-3, 3)
    cmap, ok = det.coarse_map(off), det.coarse_map(torch.randn(1, 16, 8, 8, generator=g))
    assert cmap.shape == ok.shape == (1, 8, 8)
    assert float(cmap.max() - cmap.min()) == pytest.approx(0.0)    # uniform over the part
    z = (det._part_raw(off) - mu) / sd
    assert float(cmap[0, 0, 0]) == pytest.approx(float(0.5 * 2.0 * z), rel=1e-5)
    assert float(cmap[0, 0, 0]) > float(ok[0, 0, 0]) + 1.0
    det.config.global_weight = 0.0
    assert float(det.coarse_map(off).abs().max()) == 0.0


def test_part_level_spread_is_robust_to_one_far_off_held_out_part() -> None:
    """The part-level term's scale is the held-out scores' spread: on Gaussian scores the robust spread
    matches the std, and one far-off held-out part (as leave-one-out scores of a few parts produce)
    inflates the std several-fold but moves the robust spread little."""
    from solutions.industrial_qa.detector import robust_spread

    g = torch.Generator().manual_seed(0)
    scores = 5.0 + 2.0 * torch.randn(2000, generator=g)
    assert float(robust_spread(scores)) == pytest.approx(float(scores.std()), rel=0.08)
    few = 5.0 + 2.0 * torch.randn(9, generator=g)
    spiked = torch.cat([few[:-1], torch.tensor([60.0])])
    assert float(spiked.std()) > 3 * float(few.std())
    assert float(robust_spread(spiked)) < 1.5 * float(robust_spread(few))


def test_part_level_branch_is_saved_and_shifts_scores_uniformly(tiny_detector, iqa_src: Path, tmp_path: Path) -> None:
    det = tiny_detector
    assert det.part_memory is not None and det.part_stats is not None
    x, out, without = _with_and_without(det, iqa_src, "global_weight")
    shift = (out.maps - without.maps).reshape(len(x), -1)
    assert np.abs(shift).max() > 1e-3
    np.testing.assert_allclose(shift, shift[:, :1].repeat(shift.shape[1], 1), atol=1e-4)
    np.testing.assert_allclose(out.scores - without.scores, shift[:, 0], atol=1e-4)
    again = AnomalyDetector.load(det.save(tmp_path / "m")).score_arrays(x)
    assert np.allclose(again.maps, out.maps, atol=1e-4)


def test_image_input_normalisation_ignores_part_brightness_and_contrast() -> None:
    """With ``input_norm="image"`` a part and the same part re-lit (gain + offset) give the same
    features; the dataset normalisation does not (it is what the option changes)."""
    from solutions.industrial_qa.features import FeatureConfig, FeatureNet

    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 0.5 + 0.2
    relit = x * 1.4 + 0.05
    for norm, same in (("image", True), ("dataset", False)):
        net = FeatureNet(FeatureConfig(image_size=64, widths=(8, 16, 24, 32), input_norm=norm)).eval()
        with torch.no_grad():
            fa, la = net(x)
            fb, lb = net(relit)
        assert torch.allclose(fa, fb, atol=0.05 * float(fa.abs().mean())) is same, norm
    # models saved before the option existed keep the dataset normalisation they were trained with
    assert FeatureConfig.from_dict({"image_size": 64}).input_norm == "dataset"


def test_few_shot_image_head_sees_the_unsupervised_score_and_older_heads_still_load(tiny_detector,
                                                                                   iqa_src: Path) -> None:
    from solutions.industrial_qa.fewshot import FewShotHead, _image_stats

    det = tiny_detector
    load = lambda folder, n: np.stack([to_tensor_array(read_image(p), 64)  # noqa: E731
                                       for p in sorted((iqa_src / "test" / folder).iterdir())[:n]])
    shots = np.concatenate([load("blowhole", 3), load("crack", 3)])
    normals = load("good", 6)
    assert det.fewshot is None
    plain = det.score_arrays(shots)
    head, _ = FewShotHead.fit(det, shots, None, ["blowhole"] * 3 + ["crack"] * 3, normals)
    stats = _image_stats(det, plain.knn, plain.seg, torch.from_numpy(plain.maps), None, plain.coarse)
    assert np.allclose(stats[:, -1], plain.scores, atol=1e-4)        # last column = unsupervised score
    assert len(head.img_w) == stats.shape[1]
    meta = head.meta()
    assert meta["unsup_col"] is True
    old = dict(meta, img_w=meta["img_w"][:-1], img_mu=meta["img_mu"][:-1], img_sd=meta["img_sd"][:-1])
    del old["unsup_col"]
    det.fewshot = FewShotHead.from_saved(old, head.tensors())
    try:
        assert det.fewshot.unsup_col is False
        assert np.isfinite(det.score_arrays(shots).scores).all()    # an older (shorter) head still scores
    finally:
        det.fewshot = None


def test_keep_freed_heap_stops_page_faults_of_repeated_large_buffers() -> None:
    """After ``keep_freed_heap`` a repeated 64 MB allocation + free (above glibc's 32 MB dynamic mmap
    ceiling, so by default a fresh mmap each time: ~16,000 page faults) reuses the heap; elsewhere it
    reports False and changes nothing."""
    import resource

    from solutions.industrial_qa.detector import keep_freed_heap

    if not keep_freed_heap():
        pytest.skip("not glibc: mallopt unavailable")

    def faults() -> int:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.ones(16 << 20).sum()          # 64 MB float32
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    faults()
    assert faults() < 10 * 1024                 # default glibc: ~16,000 fresh pages per allocation


def test_validation_defects_edit_only_their_mask_region_and_cover_every_kind(iqa_src: Path) -> None:
    """The validation generator (not the pretext one) changes pixels only in and just around its
    mask (soft edges), visibly inside it, and draws all five kinds; the same seed gives the same set."""
    from scipy import ndimage

    from solutions.industrial_qa.validation import KINDS, validation_set

    normals = np.stack([to_tensor_array(read_image(p), 64) for p in sorted((iqa_src / "train" / "good").iterdir())[:8]])
    x, masks, kinds = validation_set(normals, per_image=4, seed=3)
    assert set(kinds) == set(KINDS) and len(x) == len(masks) == len(kinds) >= 24
    grey = normals.mean(1)                                               # (8, S, S)
    for i in range(len(x)):
        src = grey[np.argmin([np.median(np.abs(x[i][0] - g)) for g in grey])]   # the part it was drawn on
        near = ndimage.binary_dilation(masks[i], iterations=12)
        diff = np.abs(x[i] - src[None]).max(0)
        assert diff[~near].max() < 2e-3, kinds[i]                  # untouched away from the defect
        assert diff[masks[i] > 0].mean() > 0.005, kinds[i]          # visible inside it
    again = validation_set(normals, per_image=4, seed=3)
    assert np.array_equal(again[1], masks) and np.allclose(again[0], x)


def test_pretext_targets_count_a_thin_scratch_as_defective_in_mix_and_max_modes() -> None:
    """A 1-px line through an 8x8 cell is 1/8 defective by area: ``mean`` gives 0.125, ``max`` 1,
    ``mix`` (default) their average; an empty cell stays 0 and a full one 1 in every mode; models
    saved before the option load with ``mean`` (what they were trained with)."""
    from solutions.industrial_qa.features import FeatureConfig, _seg_target

    m = torch.zeros(1, 1, 16, 16)
    m[..., 0:8, 3] = 1.0                      # thin vertical line in cell (0, 0)
    m[..., 8:16, 8:16] = 1.0                  # fully defective cell (1, 1)
    want = {"mean": 0.125, "max": 1.0, "mix": 0.5625}
    for mode, v in want.items():
        t = _seg_target(m, (2, 2), mode)[0, 0]
        assert torch.allclose(t, torch.tensor([[v, 0.0], [0.0, 1.0]])), mode
    with pytest.raises(ValueError, match="seg_target"):
        _seg_target(m, (2, 2), "median")
    assert FeatureConfig().seg_target == "mix"
    assert FeatureConfig.from_dict({"image_size": 64}).seg_target == "mean"


def test_feature_pool_smooths_the_patch_features_but_not_the_pretext_logits() -> None:
    """``feature_pool`` k averages the patch features over k x k cells (larger k: neighbouring cells
    more alike), keeps the map size, and leaves the pretext head's logits (what SSL trains) unchanged;
    the default is 5, models saved before the option load with PatchCore's 3x3; even sizes are refused."""
    from solutions.industrial_qa.features import FeatureConfig, FeatureNet

    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    state = FeatureNet(FeatureConfig(image_size=64, widths=(8, 16, 24, 32))).eval().state_dict()
    out = {}
    for k in (1, 3, 5):
        net = FeatureNet(FeatureConfig(image_size=64, widths=(8, 16, 24, 32), feature_pool=k)).eval()
        net.load_state_dict(state)
        with torch.no_grad():
            out[k] = net(x)
    rough = {k: float((f[..., 1:, :] - f[..., :-1, :]).abs().mean()) for k, (f, _) in out.items()}
    assert all(f.shape == out[1][0].shape for f, _ in out.values())
    assert rough[1] > rough[3] > rough[5]
    assert torch.equal(out[1][1], out[5][1]) and torch.equal(out[3][1], out[5][1])
    assert FeatureConfig().feature_pool == 5 and FeatureConfig.from_dict({"image_size": 64}).feature_pool == 3
    with pytest.raises(ValueError, match="feature_pool"):
        FeatureConfig(feature_pool=4)


def test_two_scale_branch_adds_a_half_resolution_map_saved_and_scored_leave_one_out(iqa_src: Path,
                                                                                    tmp_path: Path) -> None:
    """``scale2_weight`` > 0: the same net also scores each part at half resolution against its own
    per-position bank (tiles of half the cells: the same part area) and per-position statistics; the
    term is not uniform over the map, adds to the context map the few-shot heads see, survives a
    save / load, and the held-out normals' calibration scores are leave-one-out (as the other maps')."""
    from solutions.industrial_qa.data import load_batch
    from solutions.industrial_qa.detector import DetectorConfig

    cfg = DetectorConfig.tiny()
    cfg.scale2_weight = 0.5
    det = AnomalyDetector(cfg).fit(sorted((iqa_src / "train" / "good").iterdir())[:24])
    h = cfg.features.image_size // 8
    assert det.s2["memory"].shape[0] == (h // 2 // (cfg.local_block // 2)) ** 2     # tiles of 2x2 half-res cells
    assert det.s2["stats"].shape == (4, h // 2, h // 2)
    x, out, without = _with_and_without(det, iqa_src, "scale2_weight")
    shift = (out.maps - without.maps).reshape(len(x), -1)
    assert shift.std(1).min() > 1e-3                                  # a map, not a uniform offset
    assert out.coarse is not None and without.coarse is not None
    assert not torch.allclose(out.coarse, without.coarse)
    hold = load_batch([Path(p) for p in det.info["holdout_paths"]], cfg.features.image_size)
    assert np.allclose(det.holdout_outputs(hold).scores, det.info["holdout_scores"], atol=1e-4)
    again = AnomalyDetector.load(det.save(tmp_path / "m"))
    assert np.allclose(again.score_arrays(x).maps, out.maps, atol=1e-4)
    # models saved before the option load with the branch off (and score as they did)
    meta = json.loads((tmp_path / "m" / "detector.json").read_text())
    del meta["config"]["scale2_weight"]
    (tmp_path / "m" / "detector.json").write_text(json.dumps(meta))
    old = AnomalyDetector.load(tmp_path / "m")
    assert old.config.scale2_weight == 0.0 and DetectorConfig().scale2_weight == 0.5
    assert np.allclose(old.score_arrays(x).maps, without.maps, atol=1e-4)
