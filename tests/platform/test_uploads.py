from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from core.uploads import safe_filename, store_upload


@pytest.mark.parametrize("name,expected", [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
    ("scan 01;rm -rf $HOME.dcm", "scan_01_rm_-rf_HOME.dcm"),
    ("", "upload"),
    ("....", "upload"),
    ("réport.png", "report.png"),
])
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_safe_filename_never_escapes(name: str) -> None:
    out = safe_filename(name)
    assert out and "/" not in out and "\\" not in out and not out.startswith(".")
    assert len(out) <= 120 and all(c.isalnum() or c in "._-" for c in out)


def test_store_upload_limits_and_dedupes(tmp_home: Path) -> None:
    p1 = store_upload(b"abc", "../x/part.png", "industrial_qa")
    p2 = store_upload(b"abc", "part.png", "industrial_qa")
    assert p1 == p2 and p1.read_bytes() == b"abc"
    assert (tmp_home / "files" / "industrial_qa") in p1.parents
    with pytest.raises(DataError, match="empty"):
        store_upload(b"", "a.png", "industrial_qa")
    with pytest.raises(DataError, match="limit is 1 MB"):
        store_upload(b"x" * (2 * 1024 * 1024), "big.png", "industrial_qa", limit_mb=1)
