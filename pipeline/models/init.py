"""Write a preset as a checkpoint folder (the library side of ``lldm-dpo init-model``).

The folder has LLaDA's layout (config.json, safetensors, sharded with
model.safetensors.index.json when larger than ``--max-shard-size``) plus the
tokenizer files, so ``load_model(DIR)`` reads it through the same code path
as a real LLaDA checkpoint.  Written into a temporary folder beside DIR and
renamed at the end: DIR is either complete or absent.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.atomic import LEDGER, atomic_dir, check_writable
from pipeline.core.errors import UserError
from pipeline.models.loading import model_identity
from pipeline.models.presets import build_preset, preset_tokenizer


def init_model(preset: str, directory, dtype: str = "float32", overwrite: bool = False,
               max_shard_size: str = "2GB", device: str = "cpu") -> dict:
    """Build ``preset`` and save it to ``directory`` atomically; returns a summary."""
    target = Path(directory).expanduser()
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists (pass --overwrite to replace it)")
    if str(device) == "meta":
        raise UserError("init-model cannot write a model built on the meta device")
    check_writable(target, "model folder")
    model = build_preset(preset, device=device, dtype=dtype)
    tokenizer = preset_tokenizer(preset)
    # Overwrite: the old folder is set aside only once the new one is complete; files in it
    # that init-model did not write are carried over, never removed.
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in target.iterdir() if p.name != LEDGER)
    return {
        "preset": preset,
        "directory": str(target),
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "files": files,
        "identity": model_identity(target),
    }
