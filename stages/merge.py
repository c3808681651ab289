"""``lldm-dpo merge``: fold a trained LoRA adapter into its base model, saved as a full checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from pipeline.models.loading import LORA_ADAPTER_CONFIG as ADAPTER_CONFIG


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_model(adapter_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                       trust_remote_code: bool = False):
    """The adapter's base model with the adapter applied (not merged), and the tokenizer."""
    from pipeline.models.loading import load_lora_folder

    return load_lora_folder(Path(adapter_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)


@dataclass
class MergeResult:
    base: str
    out: str
    parameters: int


def merge(adapter_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> MergeResult:
    adapter_dir, out = Path(adapter_dir), Path(out)
    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    model, tokenizer = load_adapter_model(adapter_dir, dtype=dtype)
    base = model.peft_config["default"].base_model_name_or_path
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return MergeResult(base=str(base), out=str(out), parameters=sum(p.numel() for p in merged.parameters()))


def command(
    adapter: Path = typer.Argument(..., help="Adapter folder (RUN_DIR/final of a LoRA run)."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged full model."),
    dtype: str = typer.Option("float32", "--dtype", help="dtype of the merged weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Merge a LoRA adapter into its base model and save a full Hugging Face checkpoint."""
    from pipeline.stagecli import print_summary, summary_dict

    print_summary("merge", summary_dict(merge(adapter, out, dtype=dtype, overwrite=overwrite)), as_json)
