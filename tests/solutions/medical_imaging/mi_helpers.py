"""Helpers shared by the medical_imaging tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest


def dicom_testfile(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"pydicom test file {name} unavailable")
    return Path(p)
