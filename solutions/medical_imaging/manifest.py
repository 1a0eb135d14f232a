"""How Medical Imaging plugs into the platform (worker queue, console, CLI, default reporter model)."""

from __future__ import annotations

from core.registry import DefaultModel, SolutionManifest
from core.settings import Settings


def _reporter_ready(s: Settings) -> bool:
    d = s.models_dir / "medical_imaging" / "reporter"
    return all((d / f).is_file() for f in ("reporter.safetensors", "config.json", "gallery.npz"))


MANIFEST = SolutionManifest(
    name="medical_imaging",
    title="Medical Imaging",
    description="DICOM CT/MR in (de-identified), an AI report draft with similar prior cases, radiologist sign-off, DICOM SR out.",
    default_models=(
        DefaultModel(
            name="reporter",
            ready=_reporter_ready,
            train_task="medical_imaging.train_default",
            kwargs={"data": "medical/medpix2"},
            description="Dual-encoder reporter (image encoder + MiniLM report encoder + report decoder) on MedPix 2.0.",
        ),
    ),
    roles=("radiologist",),
)
