"""``lldm-dpo merge``: fold a trained LoRA adapter into its base model, saved as a full checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.atomic import atomic_dir, check_writable
from pipeline.errors import UserError
from pipeline.models import load_model
from pipeline.models.loading import LORA_ADAPTER_CONFIG as ADAPTER_CONFIG


@dataclass
class MergeResult:
    base: str
    out: str
    parameters: int


def merge(adapter_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> MergeResult:
    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    check_writable(out, "merged model folder")
    model, tokenizer = load_model(str(adapter_dir), dtype=dtype)  # base + adapter, not yet merged
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
