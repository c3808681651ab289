"""``lldm-dpo init-model PRESET DIRECTORY``: write a preset model as a checkpoint folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.cli.commands import emit_json, stage_command
from pipeline.core.config import require_choice
from pipeline.core.devices import DTYPE_NAMES


@dataclass
class InitModelConfig:
    preset: str = "tiny"
    """Preset name: skill (trained, shipped weights), tiny, micro or llada-8b-shape."""
    directory: Path = Path("models/tiny")
    """Folder to create (config.json, safetensors, tokenizer files)."""
    dtype: str = "float32"
    """dtype of the saved weights: float32, bfloat16 or float16."""
    overwrite: bool = False
    """Replace DIRECTORY if it exists."""
    max_shard_size: str = "2GB"
    """Split the weights into shards of this size."""
    device: str = "cpu"
    """Device to build the weights on before saving."""

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        require_choice("dtype", self.dtype, DTYPE_NAMES)


def run(cfg: InitModelConfig) -> dict:
    from pipeline.models.init import init_model

    return init_model(cfg.preset, cfg.directory, dtype=cfg.dtype, overwrite=cfg.overwrite,
                      max_shard_size=cfg.max_shard_size, device=cfg.device)


def _action(cfg: InitModelConfig, as_json: bool) -> None:
    summary = run(cfg)
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"wrote {summary['preset']} ({summary['parameters']:,} parameters, {cfg.dtype}) to "
                   f"{summary['directory']}")


command = stage_command(InitModelConfig, _action, positional={"preset": True, "directory": True},
                        doc="Write a preset model (config, safetensors, tokenizer) to DIRECTORY.")
