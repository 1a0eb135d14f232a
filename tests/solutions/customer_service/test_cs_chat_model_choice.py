"""Reply suggestions never train the core LM inside a serving task."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_templates_until_the_core_lm_is_trained(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.model.default as default
    from solutions.customer_service.manifest import MANIFEST
    from solutions.customer_service.reply import default_chat_model

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a serving path tried to train the core LM")

    monkeypatch.setenv("VERTICALS_CS_CHAT_MODEL", "verticals")
    monkeypatch.setattr(default, "ensure_default_lm", boom)
    assert default_chat_model() is None  # KB-template replies
    core_lm = next(m for m in MANIFEST.default_models if m.name == "core-lm")
    assert core_lm.train_task == "core.train_default_lm"  # `verticals up` trains it in the background
    from core.settings import get_settings

    assert core_lm.ready(get_settings()) is False
