"""How Customer service plugs into the platform (worker queue, console, CLI, default models)."""

from __future__ import annotations

from core.registry import DefaultModel, SolutionManifest
from core.settings import Settings

NAME = "customer_service"


def _ready(folder: str, marker: str):  # noqa: ANN202 - returns a readiness predicate
    def ready(s: Settings) -> bool:
        return (s.models_dir / NAME / folder / marker).is_file()

    return ready


def _core_lm_ready() -> bool:
    from core.model.default import default_lm_ready

    return default_lm_ready()


MANIFEST = SolutionManifest(
    name=NAME,
    title="Customer service",
    description="Dialogue state tracking, next-action and reply suggestions for support agents.",
    default_models=(
        DefaultModel(name="dst-sgd", ready=_ready("dst-sgd", "heads.safetensors"),
                     train_task=f"{NAME}.train_default", kwargs={"task": "dst", "dataset": "sgd"},
                     description="Schema-guided dialogue state tracker (SGD train, frozen MiniLM + heads)"),
        DefaultModel(name="actions-star", ready=_ready("actions-star", "actions.pkl"),
                     train_task=f"{NAME}.train_default", kwargs={"task": "actions", "dataset": "star"},
                     description="Next-action suggestion (STAR wizard actions)"),
        DefaultModel(name="core-lm", ready=lambda s: _core_lm_ready(),
                     train_task="core.train_default_lm",
                     description="Shared core LM behind reply suggestions (KB-template replies until it is ready)"),
        DefaultModel(name="intents-clinc150", ready=_ready("intents-clinc150", "classifier.pkl"),
                     train_task=f"{NAME}.train_default", kwargs={"task": "intents", "dataset": "clinc150"},
                     description="Intent classifier with out-of-scope abstention (CLINC150)"),
    ),
    roles=("agent",),
)
