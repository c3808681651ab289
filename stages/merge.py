"""``lldm-dpo merge``: fold a trained LoRA adapter into its base model, saved as a full checkpoint.

The model code (torch, transformers, peft) is imported when the command runs, not when it is parsed: ``merge
--help`` and a refused flag need only ``MergeConfig``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli.commands import stage_command, summarize
from pipeline.core.atomic import atomic_dir, check_writable
from pipeline.core.config import require_choice
from pipeline.core.devices import DTYPE_NAMES, torch_dtype
from pipeline.core.errors import UserError
from pipeline.core.paths import LORA_ADAPTER_CONFIG as ADAPTER_CONFIG


def load_model(*args, **kwargs):
    """``pipeline.models.load_model``, imported on the first load."""
    import pipeline.models

    return pipeline.models.load_model(*args, **kwargs)


@dataclass
class MergeResult:
    base: str
    out: str
    parameters: int


def merge(adapter_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False,
          load_in_4bit: bool = False) -> MergeResult:
    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    check_writable(out, "merged model folder")
    model, tokenizer = (_dequantized_base_with_adapter(adapter_dir, dtype) if load_in_4bit
                        else load_model(str(adapter_dir), dtype=dtype))  # base + adapter, not yet merged
    base = model.peft_config["default"].base_model_name_or_path
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return MergeResult(base=str(base), out=str(out), parameters=sum(p.numel() for p in merged.parameters()))


def _dequantized_base_with_adapter(adapter_dir: Path, dtype: str):
    """The base as a 4-bit run trained against it (NF4 blocks, double quantization), each quantized weight
    dequantized to ``dtype``, with the adapter applied: merging then adds the adapter to the weights the
    policy was trained with, and the merged model holds no quantization state."""
    from peft import PeftModel

    from pipeline.models.loading import _load_tokenizer
    from pipeline.models.quant import dequantize_linears, require_bitsandbytes

    require_bitsandbytes("cpu")
    base_name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty")
    base, tokenizer = load_model(base_name, dtype="bfloat16", load_in_4bit=True)
    dequantize_linears(base, torch_dtype(dtype))
    base.to(torch_dtype(dtype))
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(base.config, name):
            delattr(base.config, name)
    for name, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(base, name):
            with contextlib.suppress(AttributeError):  # a read-only property on this transformers version
                setattr(base, name, value)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = _load_tokenizer(adapter_dir, False)
    return model, tokenizer


@dataclass
class MergeConfig:
    adapter: Path = Path("runs/dpo/final")
    """Adapter folder (RUN_DIR/final of a LoRA run)."""
    out: Path = Path("runs/dpo/merged")
    """Folder for the merged full model."""
    dtype: str = "float32"
    """dtype of the merged weights: float32, bfloat16 or float16."""
    load_in_4bit: bool = False
    """The adapter was trained on a 4-bit base (train --load-in-4bit): quantize the base as training did, dequantize
    it to dtype, then fold the adapter in, so the merged model computes with the weights the policy trained on."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        self.adapter, self.out = Path(self.adapter), Path(self.out)
        require_choice("dtype", self.dtype, DTYPE_NAMES)


def run(cfg: MergeConfig) -> MergeResult:
    return merge(cfg.adapter, cfg.out, dtype=cfg.dtype, overwrite=cfg.overwrite, load_in_4bit=cfg.load_in_4bit)


command = stage_command(MergeConfig, summarize("merge", run), positional={"adapter": True},
                        doc="Merge a LoRA adapter into its base model and save a full Hugging Face checkpoint.")
