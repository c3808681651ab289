"""``push_to_hub``: the final model folder (with its README.md model card) uploaded to the Hugging Face Hub.

transformers' names: ``push_to_hub``, ``hub_model_id`` (the repository, ``user/name`` or ``name``),
``hub_token`` (default: what huggingface_hub finds itself, ``HF_TOKEN`` or the saved login) and
``hub_private_repo``. The upload goes through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, then
``upload_folder`` of ``RUN/final`` at the end of the run, from the main process only. Checkpoints are not
pushed (transformers' ``hub_strategy: end``). The token is a secret: it is never written to config.yaml, a
checkpoint, the model card or a tracker's config (``SECRET_FIELDS``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from pipeline.core.atomic import LEDGER
from pipeline.core.config import require
from pipeline.core.errors import UserError

SECRET_FIELDS = ("hub_token",)
"""Config fields whose values are never recorded (config.yaml, model cards, trackers)."""

def check_hub_args(push_to_hub: bool, hub_model_id: Optional[str]) -> None:
    """Refuse push_to_hub without a repository before anything runs (a one-line ConfigError)."""
    if not push_to_hub:
        return
    repo = (hub_model_id or "").strip()
    require(bool(repo), "push_to_hub needs hub_model_id (the Hub repository, e.g. user/my-llada-dpo); give "
                        "--hub-model-id or hub_model_id in the config")
    require(repo.count("/") <= 1 and not repo.startswith("/") and not repo.endswith("/") and " " not in repo,
            f"hub_model_id: '{hub_model_id}' is not a Hub repository id (name or user/name)")


def push_folder(folder: Path, cfg: Any, *, stage: str) -> Optional[str]:
    """Upload ``folder`` to ``cfg.hub_model_id`` when ``cfg.push_to_hub``; returns the repository's URL (None
    when not pushing). A Hub failure is one line saying the model stays saved in ``folder``."""
    if not cfg.push_to_hub:
        return None
    check_hub_args(True, cfg.hub_model_id)
    from huggingface_hub import HfApi

    folder, repo_id = Path(folder), cfg.hub_model_id.strip()
    api = HfApi(token=cfg.hub_token or None)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=cfg.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          ignore_patterns=[LEDGER, f"**/{LEDGER}"],  # ownership records stay local
                          commit_message=f"lldm-dpo {stage}: {folder.name} of {Path(cfg.out).name}")
    except Exception as exc:  # network, authentication, permissions: all the Hub's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"push_to_hub: uploading {folder} to {repo_id} failed ({type(exc).__name__}: {first}); the "
                        f"model is saved there: upload it later with `hf upload {repo_id} {folder}`") from None
    link = str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")
    print(f"pushed {folder} to {link}", file=sys.stderr, flush=True)
    return link
