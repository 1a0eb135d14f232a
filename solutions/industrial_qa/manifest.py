"""How Industrial QA plugs into the platform (worker queue, console, CLI, default model)."""

from __future__ import annotations

from core.registry import DefaultModel, SolutionManifest
from core.settings import Settings

DEFAULT_LINE = "magnetic_tile"


def _default_ready(s: Settings) -> bool:
    root = s.models_dir / "industrial_qa" / DEFAULT_LINE
    return root.is_dir() and any((p / "detector.json").is_file() and (p / "weights.safetensors").is_file()
                                 for p in root.iterdir() if p.is_dir())


MANIFEST = SolutionManifest(
    name="industrial_qa",
    title="Industrial QA",
    description="Defect detection on production lines: heatmaps, calibrated decisions, review workflow.",
    default_models=(
        DefaultModel(
            name="magnetic_tile-detector",
            ready=_default_ready,
            train_task="industrial_qa.train_default",
            kwargs={"line": DEFAULT_LINE, "data": "industrial/magnetic_tile"},
            description="Self-supervised defect detector for the magnetic-tile line (normals only).",
        ),
    ),
    roles=("operator",),
)
