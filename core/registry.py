"""How a solution plugs into the platform.

A solution is *built* when ``solutions/<name>/manifest.py`` exists and defines ``MANIFEST``. The
platform then starts its worker and console, registers ``solutions/<name>/cli.py:app`` as the
``verticals <name-with-dashes>`` command group, and, for each default model that is not ready,
queues its training task on the ``training`` queue (at most one job per key), whose progress the
console shows via ``core.jobs``.

Training task convention: ``@app.task(name="<solution>.train_<what>")`` taking ``job_key`` (str)
plus the model's ``kwargs``, reporting through ``core.jobs.JobReporter(job_key, ...)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import REPO_ROOT, SOLUTION_NAMES, Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultModel:
    """A model a solution needs to serve; trained in the background when missing."""

    name: str
    ready: Callable[[Settings], bool]
    train_task: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def job_key(self) -> str:
        return f"train:{self.train_task}:{self.name}"


@dataclass(frozen=True)
class SolutionManifest:
    name: str
    title: str
    description: str
    default_models: tuple[DefaultModel, ...] = ()
    roles: tuple[str, ...] = ()

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    @property
    def console_entry(self) -> Path:
        return REPO_ROOT / "solutions" / self.name / "console" / "app.py"


def load_manifest(name: str) -> SolutionManifest | None:
    """The solution's manifest, or None when the solution is not built in this checkout."""
    if name not in SOLUTION_NAMES:
        from core.errors import ConfigError

        raise ConfigError(f"unknown solution {name!r}; choose from {', '.join(SOLUTION_NAMES)}")
    if importlib.util.find_spec(f"solutions.{name}") is None:
        return None
    if importlib.util.find_spec(f"solutions.{name}.manifest") is None:
        return None
    mod = importlib.import_module(f"solutions.{name}.manifest")
    return getattr(mod, "MANIFEST", None)


def built_solutions(selected: list[str] | None = None) -> list[SolutionManifest]:
    names = selected if selected is not None else get_settings().solutions
    out = []
    for n in names:
        m = load_manifest(n)
        if m is not None:
            out.append(m)
    return out


def model_states(manifest: SolutionManifest, settings: Settings | None = None) -> list[tuple[DefaultModel, bool]]:
    s = settings or get_settings()
    states = []
    for m in manifest.default_models:
        try:
            ok = bool(m.ready(s))
        except Exception as e:  # a broken checkpoint counts as missing
            log.warning("model %s readiness check failed: %s", m.name, e)
            ok = False
        states.append((m, ok))
    return states


def submit_missing_models(manifests: list[SolutionManifest]) -> list[str]:
    """Queue training for every default model that is not ready. Returns the job keys submitted."""
    from core.jobs import claim_job, get_job
    from core.queue import app

    submitted = []
    for manifest in manifests:
        for model, ok in model_states(manifest):
            if ok:
                continue
            if not claim_job(model.job_key, kind="train", solution=manifest.name):
                continue  # already queued or running
            res = app.send_task(model.train_task, kwargs={"job_key": model.job_key, **model.kwargs})
            from core.db import session_scope
            from core.jobs import Job

            with session_scope() as s:
                job = s.get(Job, get_job(model.job_key).id)  # type: ignore[union-attr]
                job.celery_id = res.id
            submitted.append(model.job_key)
    return submitted
