"""pipeline.trainer.hub: push_to_hub through huggingface_hub's HfApi (a recording stand-in: no network)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.core.errors import ConfigError, UserError
from pipeline.trainer.hub import check_hub_args, push_folder


class RecordingApi:
    calls: list = []

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))


@pytest.fixture
def api(monkeypatch):
    import huggingface_hub

    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def _cfg(tmp_path, **kw):
    return SimpleNamespace(**{"push_to_hub": True, "hub_model_id": "me/llada-dpo", "hub_token": None,
                              "hub_private_repo": None, "out": tmp_path / "run", **kw})


def test_check_hub_args_needs_a_repository_only_when_pushing():
    check_hub_args(False, None)
    check_hub_args(True, "me/x")
    check_hub_args(True, "x")
    for bad in (None, "", "  "):
        with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
            check_hub_args(True, bad)
    with pytest.raises(ConfigError, match="is not a Hub repository id"):
        check_hub_args(True, "a/b/c")


def test_push_creates_the_repository_and_uploads_the_folder(api, tmp_path):
    folder = tmp_path / "run" / "final"
    folder.mkdir(parents=True)
    url = push_folder(folder, _cfg(tmp_path, hub_private_repo=True, hub_token="hf_x"), stage="sft")
    assert url == "https://huggingface.co/me/llada-dpo"
    (_, init), (_, create), (_, upload) = api.calls
    assert init == {"token": "hf_x"}
    assert create["repo_id"] == "me/llada-dpo" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/llada-dpo" and upload["folder_path"] == str(folder)
    assert ".lldm-dpo-written" in upload["ignore_patterns"]  # the ownership record is not uploaded


def test_not_pushing_touches_nothing(api, tmp_path):
    assert push_folder(tmp_path, _cfg(tmp_path, push_to_hub=False), stage="train") is None
    assert api.calls == []


def test_a_hub_failure_is_one_line_saying_where_the_model_stays(api, monkeypatch, tmp_path):
    def refuse(self, **kwargs):
        raise OSError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(RecordingApi, "upload_folder", refuse)
    with pytest.raises(UserError, match=r"push_to_hub: uploading .*final to me/llada-dpo failed \(OSError: 401 "
                                        r"Client Error: Unauthorized\); the model is saved there") as err:
        push_folder(tmp_path / "final", _cfg(tmp_path), stage="train")
    assert "\n" not in str(err.value)
