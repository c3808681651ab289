"""Other masked diffusion models through transformers' Auto classes.

The model stays the transformers object it is (``save_pretrained``, peft and
gradient checkpointing keep working); loading adds what the scorer needs:
``model.logits_shift`` (True when position i predicts token i+1, as in
Dream), ``model.config.mask_token_id`` and ``model.final_hidden``, the input
of the LM head, captured with a hook that stops the forward pass before the
head so no [B, S, V] logits are ever built.
"""

from __future__ import annotations

import types

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BitsAndBytesConfig

from pipeline.core.errors import UserError
from pipeline.models.quant import require_bitsandbytes

# model_type values whose logits are shifted by one (autoregressive init).
SHIFTED_MODEL_TYPES = {"dream"}


class _HeadReached(Exception):
    """Raised by the pre-hook on the LM head to stop the forward pass there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor the LM head receives, [B, S, H] (after every head transform but the last linear)."""
    head = self.get_output_embeddings()

    def grab(_module, args):
        raise _HeadReached(args[0])

    handle = head.register_forward_pre_hook(grab)
    try:
        self(input_ids=input_ids, attention_mask=attention_mask)
    except _HeadReached as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"{type(self).__name__}'s forward never called its output embeddings")


def adapt(model: nn.Module, *, mask_token_id: int | None, logits_shift: bool | None, source: str = "model") -> nn.Module:
    """Give a transformers masked LM the attributes the pipeline reads; returns the same object."""
    config = model.config
    if model.get_output_embeddings() is None:
        raise UserError(f"{source}: {type(model).__name__} has no LM head (output embeddings); not a diffusion LM")
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
    if mask_token_id is None:
        raise UserError(f"{source}: no mask_token_id in config.json or tokenizer; pass it explicitly")
    if logits_shift is None:
        logits_shift = getattr(config, "logits_shift", None)
    if logits_shift is None:
        logits_shift = getattr(config, "model_type", "").lower() in SHIFTED_MODEL_TYPES
    # Stored on the config so save_pretrained keeps both for the next load.
    config.mask_token_id = int(mask_token_id)
    config.logits_shift = bool(logits_shift)
    model.logits_shift = bool(logits_shift)
    if not hasattr(model, "final_hidden"):
        model.final_hidden = types.MethodType(_final_hidden, model)
    return model


def pretrained_kwargs(dtype: torch.dtype, device, load_in_4bit: bool = False, skip_modules=None) -> dict:
    """``from_pretrained`` arguments: safetensors only, dtype, direct-to-device loading off CPU, NF4 on request."""
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 renamed torch_dtype to dtype.
    kwargs = {"dtype" if major >= 5 else "torch_dtype": dtype, "use_safetensors": True}
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": str(device)}  # stream shards straight to the device
    if load_in_4bit:
        require_bitsandbytes(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip_modules,
        )
    return kwargs


def load_adapter_model(path, *, dtype, device, trust_remote_code: bool, mask_token_id=None, logits_shift=None,
                       load_in_4bit: bool = False):
    """Load a non-LLaDA folder: AutoModelForMaskedLM when the architecture has one, else AutoModel."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        hint = "" if trust_remote_code else " (custom code needs --trust-remote-code)"
        raise UserError(f"{path}: cannot read config.json: {str(exc).splitlines()[0]}{hint}") from None
    kwargs = pretrained_kwargs(dtype, device, load_in_4bit)
    kwargs["trust_remote_code"] = trust_remote_code
    auto_map = getattr(config, "auto_map", None) or {}
    mlm_known = type(config) in AutoModelForMaskedLM._model_mapping or "AutoModelForMaskedLM" in auto_map
    loader = AutoModelForMaskedLM if mlm_known else AutoModel
    model = loader.from_pretrained(path, config=config, **kwargs)
    return adapt(model, mask_token_id=mask_token_id, logits_shift=logits_shift, source=str(path)).eval()
