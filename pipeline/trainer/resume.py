"""What a resumed run must share with the run it continues: the settings that shape it.

A resume continues one run: its recorded config (``config.yaml``, written once when the run started)
is the run's identity and is never rewritten. A setting that changes what the remaining steps compute
(learning rate and schedule, beta, losses and their weights, LoRA, numerics, seed, data, ...) is refused,
naming it and both values; settings that only change speed, memory, logging or where output goes
(``FREE``) may differ.

Where a resume starts (``resume_from_checkpoint``, transformers' name): ``true`` (``--resume``) is the newest
complete ``checkpoint-N`` in the run folder; a path is that checkpoint folder, wherever it is. Either is
checked by content, not by where it lies: the checkpoint's own copy of the run's recorded config (and the
run folder's, when it has one) against this run's settings, then its data layout and data fingerprint
(pipeline.trainer.checkpoint.load_checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from pipeline.core.digest import canonical_json
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.paths import CONFIG_FILE

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "", "none", "null")


def resume_setting(resume: bool, resume_from_checkpoint: Any) -> tuple[bool, Optional[str]]:
    """``(resume, resume_from_checkpoint)`` normalised: transformers' ``resume_from_checkpoint`` is true (the newest
    checkpoint in the run folder, as ``--resume``), false/null (``resume`` decides) or a checkpoint folder's path
    (which implies ``resume``)."""
    value = resume_from_checkpoint
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        value = value.strip().lower() in _TRUE
    if value is None or value is False:
        return bool(resume), None
    if value is True:
        return True, None
    if isinstance(value, (str, Path)):
        return True, str(value)
    raise ConfigError(f"resume_from_checkpoint must be true, false or a checkpoint folder's path, got {value!r}")


def find_resume_checkpoint(out: Path, given: Optional[str]) -> Path:
    """The checkpoint a resume continues from: ``given`` (a ``checkpoint-N`` folder) or, when None, the newest
    complete one in ``out``; a one-line error when there is none, or it is incomplete or of the old layout."""
    from pipeline.trainer import (
        checkpoint as ck,  # lazy: the configs normalise resume_setting without loading checkpoints
    )

    out = Path(out)
    if given is None:
        found, legacy = ck.list_checkpoints(out), ck.legacy_checkpoints(out)
        if found:
            return found[-1]
        if legacy:
            raise ck.legacy_error(legacy[-1])
        raise UserError(f"{out}: --resume (resume_from_checkpoint: true) given but the run folder holds no "
                        "complete checkpoint-N folder")
    path = Path(given)
    if not path.is_dir():
        raise UserError(f"{path}: resume_from_checkpoint: no such checkpoint folder")
    if ck.LEGACY_STEP_PATTERN.match(path.name) or (path / "trainable.safetensors").is_file():
        raise ck.legacy_error(path)
    if not ck.is_complete(path):
        inside = ck.list_checkpoints(path)
        hint = (f"; it is a run folder: give one of its checkpoints ({inside[-1].name} is the newest)" if inside
                else " (killed while it was written, or not a checkpoint)")
        raise UserError(f"{path}: resume_from_checkpoint: not a complete checkpoint of lldm-dpo train or sft "
                        f"(needs {ck.RECORD} and {ck.STATE}){hint}")
    return path


def check_resume_source(out: Path, given: Optional[str], current: dict[str, Any], free: Iterable[str]) -> Path:
    """``find_resume_checkpoint``, then its recorded config (and the run folder's, when it has one) against
    ``current``: the checkpoint continues this run only when every setting outside ``free`` is the same."""
    ckpt = find_resume_checkpoint(out, given)
    free = tuple(free)
    for recorded in dict.fromkeys([Path(ckpt) / CONFIG_FILE, Path(out) / CONFIG_FILE]):
        check_resume_config(recorded, current, free)
    return ckpt


def recorded_config(path: Path) -> dict[str, Any] | None:
    """The config a run recorded when it started (None when the file is absent)."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: the run's recorded config does not read as YAML ({exc}); cannot check "
                        "that --resume continues the same run") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the run's recorded config is not a mapping; cannot check --resume")
    return data


def _same(a: Any, b: Any) -> bool:
    return canonical_json(a) == canonical_json(b)


def changed_settings(recorded: dict[str, Any], current: dict[str, Any], free: Iterable[str]) -> list[str]:
    """Names of the settings (outside ``free``) whose values differ. A setting the record lacks (one added to
    the program after the run started) is not compared; one the record has and this run lacks is a difference."""
    free = set(free)
    keys = [k for k in current if k not in free and k in recorded] + [
        k for k in recorded if k not in current and k not in free]
    return [k for k in keys if not _same(recorded.get(k), current.get(k))]


def check_resume_config(path: Path, current: dict[str, Any], free: Iterable[str]) -> None:
    """Refuse a resume whose settings differ from the run's recorded ones (the first difference, both values)."""
    recorded = recorded_config(path)
    if recorded is None:
        return
    diffs = changed_settings(recorded, current, free)
    if diffs:
        k = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:4])})" if len(diffs) > 1 else ""
        raise UserError(f"{path}: cannot resume with {k} = {json.dumps(current.get(k), default=str)}; the run was "
                        f"started with {k} = {json.dumps(recorded.get(k), default=str)}{more}; rerun with the "
                        "run's own settings, or start afresh with --overwrite or another --out")
