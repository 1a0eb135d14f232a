"""Safe handling of user-supplied files: size limits, file names, storage paths.

Every upload or dropped file goes through :func:`store_upload`: the name is reduced to a safe
basename (no directories, no ``..``, no control or shell characters), the size is checked against
``VERTICALS_MAX_UPLOAD_MB``, and the bytes land under ``VERTICALS_HOME/files/<area>/`` with a content
hash in the name, so two uploads never overwrite each other and the same bytes are stored once.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

from core.errors import DataError
from core.settings import get_settings

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "upload") -> str:
    """A basename safe on every filesystem and in every shell: ``../../etc/passwd`` -> ``passwd``."""
    name = unicodedata.normalize("NFKD", name or "").encode("ascii", "ignore").decode()
    name = name.replace("\\", "/").split("/")[-1]
    name = _SAFE.sub("_", name).strip("._-")[:120]
    return name or default


def check_size(n_bytes: int, limit_mb: int | None = None) -> None:
    limit = (limit_mb or get_settings().max_upload_mb) * 1024 * 1024
    if n_bytes > limit:
        raise DataError(f"file is {n_bytes / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB "
                        "(VERTICALS_MAX_UPLOAD_MB)")
    if n_bytes == 0:
        raise DataError("file is empty")


def store_upload(data: bytes, filename: str, area: str, limit_mb: int | None = None) -> Path:
    """Check and store an upload; returns its path under ``VERTICALS_HOME/files/<area>/``."""
    check_size(len(data), limit_mb)
    base = get_settings().files_dir / safe_filename(area, "misc")
    base.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = (base / f"{digest}_{safe_filename(filename)}").resolve()
    if base.resolve() not in path.parents:  # belt and braces: never write outside the area
        raise DataError("refusing a file name that points outside the upload folder")
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
