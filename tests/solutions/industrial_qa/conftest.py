"""Fixtures for industrial_qa tests: a small real MVTec-layout subset and a tiny trained detector."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "industrial" / "magnetic_tile"


def make_subset(src: Path, dst: Path, n_train: int = 24, n_good: int = 6, n_per_type: int = 3,
                types: tuple[str, ...] = ("blowhole", "crack", "uneven")) -> Path:
    """Symlink a small slice of the real dataset into ``dst`` in the same MVTec layout."""
    def link(files: list[Path], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            (folder / f.name).symlink_to(f)

    link(sorted((src / "train" / "good").iterdir())[:n_train], dst / "train" / "good")
    link(sorted((src / "test" / "good").iterdir())[:n_good], dst / "test" / "good")
    for t in types:
        imgs = sorted((src / "test" / t).iterdir())[:n_per_type]
        link(imgs, dst / "test" / t)
        link([src / "ground_truth" / t / f"{p.stem}_mask.png" for p in imgs], dst / "ground_truth" / t)
    return dst


@pytest.fixture(scope="session")
def iqa_src() -> Path:
    if not SRC.is_dir():
        pytest.skip(f"{SRC} missing (shared data sits beside the checkout)")
    return SRC


@pytest.fixture
def tiny_mvtec(iqa_src: Path, tmp_path: Path) -> Path:
    return make_subset(iqa_src, tmp_path / "tiny_mvtec")


def _tiny_config():  # noqa: ANN202
    from solutions.industrial_qa.detector import DetectorConfig

    return DetectorConfig.tiny()


@pytest.fixture
def tiny_config():  # noqa: ANN201
    return _tiny_config()


@pytest.fixture(scope="session")
def tiny_detector(iqa_src: Path):  # noqa: ANN201
    """A detector fitted on 24 real normal images with a tiny config (seconds on 2 cores)."""
    import torch

    from solutions.industrial_qa.detector import AnomalyDetector

    torch.manual_seed(0)
    paths = sorted((iqa_src / "train" / "good").iterdir())[:24]
    return AnomalyDetector(_tiny_config()).fit(paths)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # noqa: ANN202
    """Run ``verticals industrial-qa ...`` in-process through the real entry point (core.cli.main)."""
    from core.cli import main
    from core.db import reset_engines
    from core.settings import reset_settings

    def run(*args: str, home: Path) -> Result:
        monkeypatch.setenv("VERTICALS_HOME", str(home))
        reset_settings()
        reset_engines()
        capsys.readouterr()
        code = 0
        try:
            main(["industrial-qa", *args])
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run
