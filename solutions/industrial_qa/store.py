"""Versioned detector storage per line under ``get_settings().model_dir("industrial_qa", <line>)``.

Layout::

    models/industrial_qa/<line>/v0001/{weights.safetensors, detector.json}
    models/industrial_qa/<line>/v0002/...
    models/industrial_qa/<line>/ACTIVE          text file naming the active version ("v0002")

The file system is the source of truth for weights (CLI use needs no database); the ``iqa_model_versions``
table mirrors it for the console.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import DataError, ModelNotReady
from core.settings import get_settings

DEFAULT_LINE = "magnetic_tile"
_LINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_line(name: str) -> str:
    """Line names become folder names: letters, digits, ``_ . -`` only."""
    if not _LINE_RE.match(name or ""):
        raise DataError(f"invalid line name {name!r}: use letters, digits, '_', '.', '-' (max 100)")
    return name


def line_dir(line: str) -> Path:
    return get_settings().model_dir("industrial_qa", check_line(line))


def list_versions(line: str) -> list[str]:
    root = get_settings().models_dir / "industrial_qa" / check_line(line)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d{4}", p.name)
                  and (p / "detector.json").is_file())


def new_version_dir(line: str) -> tuple[str, Path]:
    """Reserve the next version folder (``v0001``, ``v0002``, ...)."""
    root = line_dir(line)
    existing = [int(p.name[1:]) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d{4}", p.name)]
    v = f"v{(max(existing) + 1 if existing else 1):04d}"
    (root / v).mkdir()
    return v, root / v


def set_active(line: str, version: str) -> None:
    if version not in list_versions(line):
        raise DataError(f"line {line!r} has no trained version {version!r}")
    (line_dir(line) / "ACTIVE").write_text(version)


def active_version(line: str) -> str | None:
    versions = list_versions(line)
    if not versions:
        return None
    marker = get_settings().models_dir / "industrial_qa" / line / "ACTIVE"
    if marker.is_file():
        v = marker.read_text().strip()
        if v in versions:
            return v
    return versions[-1]


def is_ready(line: str) -> bool:
    try:
        return active_version(line) is not None
    except DataError:
        return False


def active_path(line: str) -> Path:
    v = active_version(line)
    if v is None:
        raise ModelNotReady(f"line {line!r} has no trained model; run "
                            f"`verticals industrial-qa train --data DIR --line {line}`")
    return get_settings().models_dir / "industrial_qa" / line / v
