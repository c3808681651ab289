"""``lldm-dpo merge``: fold a trained LoRA adapter into its base model, saved as a full checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_model(adapter_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                       trust_remote_code: bool = False):
    """The base model named in the adapter's config with the adapter applied (not merged), and the tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipeline.models import load_model

    adapter_dir = Path(adapter_dir)
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read base_model_name_or_path ({exc})") from None
    if not base:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty")
    model, tokenizer = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    if (adapter_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    return model, tokenizer


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
