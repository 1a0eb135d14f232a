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
    from core.settings import reset_settings

    reset_settings()
    monkeypatch.setattr(default, "ensure_default_lm", boom)
    assert default_chat_model() is None  # KB-template replies
    core_lm = next(m for m in MANIFEST.default_models if m.name == "core-lm")
    assert core_lm.train_task == "core.train_default_lm"  # `verticals up` trains it in the background
    from core.settings import get_settings

    assert core_lm.ready(get_settings()) is False


def test_chat_model_setting_picks_templates_or_a_class(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import reset_settings
    from solutions.customer_service.reply import default_chat_model

    monkeypatch.setenv("VERTICALS_CS_CHAT_MODEL", "template")
    reset_settings()
    assert default_chat_model() is None
    monkeypatch.setenv("VERTICALS_CS_CHAT_MODEL", "langchain_core.language_models.fake_chat_models:FakeListChatModel")
    reset_settings()
    with pytest.raises(Exception, match="responses"):  # the class was found and built (it needs responses=)
        default_chat_model()
    reset_settings()
