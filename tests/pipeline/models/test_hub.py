"""Hub ids: refused offline with a way out, read through the hub cache when network access is allowed.
No test downloads: the hub call is replaced by a local folder."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.models import load_model, model_identity
from pipeline.models.init import init_model


def test_offline_refusal_names_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not available offline.*--online"):
        load_model("some-org/some-model")


def test_online_hub_id_loads_its_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    folder = tmp_path / "snapshot"
    init_model("micro", folder)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **_):
        calls.append((repo_id, local_files_only, tuple(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    model, tokenizer = load_model("some-org/micro-llada")
    assert model.config.model_type == "llada" and tokenizer.mask_token_id is not None
    assert calls[0][:2] == ("some-org/micro-llada", False) and "*.py" not in calls[0][2]  # no code unless allowed
    assert model_identity("some-org/micro-llada") == model_identity(folder)


def test_cli_is_offline_unless_asked(monkeypatch):
    from stages.cli import _leading_online, set_environment

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LLDM_DPO_ONLINE", raising=False)
    set_environment(online=False)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    set_environment(online=True)
    assert "HF_HUB_OFFLINE" not in os.environ
    assert _leading_online(["--online", "score-ref", "x"]) and not _leading_online(["score-ref", "--online"])
