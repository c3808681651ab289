"""What a resumed run must share with the run it continues: the settings that shape it.

A resume continues one run: its recorded config (``config.yaml``, written once when the run started)
is the run's identity and is never rewritten. A setting that changes what the remaining steps compute
(learning rate and schedule, beta, losses and their weights, LoRA, numerics, seed, data, ...) is refused,
naming it and both values; settings that only change speed, memory, logging or where output goes
(``FREE``) may differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import UserError


def recorded_config(path: Path) -> dict[str, Any] | None:
    """The config a run recorded when it started (None when the file is absent)."""
    import yaml

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
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


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
