"""The one model loader, ``load(name_or_path, numerics, device)``: preset, folder or adapter, in the run's numerics.

``load`` is what every stage and recipe calls (score-ref, train, sft, eval, generate, make-pairs); what a caller
adds on top (LoRA, init checks, eval mode for sampling) stays with the caller. ``load_model`` is its name
resolution in one weights dtype, for callers that need the model as stored (merge, tests). Plus the cache
identities of a model and a tokenizer.

Name resolution:
1. a preset name (``tiny``, ``micro``, ``llada-8b-shape``) -> built in memory;
2. a local folder whose config.json says ``model_type: llada`` -> the native
   LLaDA class (no remote code, whatever ``auto_map`` says);
3. a LoRA adapter folder (``adapter_config.json``, what ``train --lora-r`` saves)
   -> its base model, resolved by these same rules, with the adapter applied;
4. any other local folder -> the transformers adapter;
5. anything else is a hub id: read from the local Hugging Face cache, and
   downloaded only when network access is allowed (``HF_HUB_OFFLINE`` unset
   or 0; the CLI sets it to 1 unless given ``--online`` or LLDM_DPO_ONLINE=1).

Weights are read from safetensors only: pickled ``.bin`` files can run code
when loaded and are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from pipeline.core.atomic import file_sha256
from pipeline.core.devices import torch_dtype as _torch_dtype
from pipeline.core.digest import content_digest
from pipeline.core.errors import UserError
from pipeline.core.paths import LORA_ADAPTER_CONFIG
from pipeline.models.adapter import load_adapter_model, pretrained_kwargs
from pipeline.models.llada import LLaDAModelLM
from pipeline.models.numerics import Numerics, prepare_4bit
from pipeline.models.presets import PRESET_VERSION, PRESETS, build_preset, is_preset, preset_config, preset_tokenizer
from pipeline.models.quant import quantize_linears, require_bitsandbytes, settle
from pipeline.models.tokenizer import CHAT_TEMPLATE, END_HEADER, EOT, START_HEADER


def load(name_or_path, numerics: Numerics | None = None, device="cpu", *, trust_remote_code: bool = False,
         seed: int | None = None):
    """``(model, tokenizer)`` of ``name_or_path`` (a preset, a model folder, a LoRA adapter folder or a hub id
    in the local cache) on ``device`` in ``numerics`` (default: float32 weights).

    A 4-bit base (``numerics.load_in_4bit``) is checked first (bitsandbytes, the device), loaded in bfloat16 and
    prepared as train prepares it (peft's k-bit preparation, frozen), so score-ref, train and eval compute
    alike. ``trust_remote_code`` runs a model's own code only when the user passed the flag. ``seed``: a
    preset's initialisation seed (its recorded one when None); a folder ignores it. The model comes in eval
    mode, frozen only when 4-bit; the mixed precision is the caller's autocast (``numerics.autocast``).
    """
    import pipeline.models as models  # looked up at call time: benches and tests substitute load_model

    numerics = numerics or Numerics()
    if numerics.load_in_4bit:  # the clear errors of a 4-bit base that cannot run here (bitsandbytes, device)
        require_bitsandbytes(torch.device(device))
        model, tokenizer = models.load_model(name_or_path, dtype="bfloat16", device=str(device),
                                             trust_remote_code=trust_remote_code, load_in_4bit=True, seed=seed)
        model = prepare_4bit(model)
        model.requires_grad_(False)
        return model, tokenizer
    return models.load_model(name_or_path, dtype=numerics.dtype, device=str(device),
                             trust_remote_code=trust_remote_code, seed=seed)


def load_lora_folder(path: Path, *, dtype="float32", device="cpu", trust_remote_code: bool = False,
                     load_in_4bit: bool = False):
    """The base model named in a LoRA adapter folder with the adapter applied (not merged)."""
    from peft import PeftModel

    config_path = path / LORA_ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{config_path}: cannot read base_model_name_or_path ({exc})") from None
    if not base:
        raise UserError(f"{config_path}: base_model_name_or_path is empty")
    model, tokenizer = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                  load_in_4bit=load_in_4bit)
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    model.eval()
    if (path / "tokenizer_config.json").is_file():
        tokenizer = _load_tokenizer(path, trust_remote_code)
    return model, tokenizer


def load_model(
    name_or_path,
    *,
    dtype="float32",
    device="cpu",
    trust_remote_code: bool = False,
    mask_token_id: int | None = None,
    logits_shift: bool | None = None,
    load_in_4bit: bool = False,
    seed: int | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` in ``dtype`` (``load``'s name resolution).

    ``mask_token_id`` / ``logits_shift`` override what an adapter model's
    config says (native LLaDA: mask id from config.json, never shifted).
    ``load_in_4bit`` (QLoRA; bitsandbytes on CUDA or the CPU) quantizes the block
    projections to NF4 (double quantization) at load time, computing in ``dtype``
    (a preset is built, then quantized in memory); the embedding and LM head stay
    unquantized. ``seed``: a preset's initialisation seed (None: the preset's own).
    """
    torch_dtype = _torch_dtype(dtype)
    name = str(name_or_path)
    if is_preset(name):
        model = build_preset(name, device=device, dtype=torch_dtype, seed=seed)
        if load_in_4bit:
            require_bitsandbytes(device)
            quantize_linears(model, torch_dtype)
            settle(model.eval())
        return model, preset_tokenizer(name)
    path = _model_folder(name, trust_remote_code)
    if (path / LORA_ADAPTER_CONFIG).is_file():
        return load_lora_folder(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                load_in_4bit=load_in_4bit)
    config = _read_config(path, name)
    _require_safetensors(path)
    tokenizer = _load_tokenizer(path, trust_remote_code)
    if config.get("model_type") == "llada":
        model = _load_llada(path, torch_dtype, device, load_in_4bit)
    else:
        if mask_token_id is None and config.get("mask_token_id") is None:
            mask_token_id = tokenizer.mask_token_id
        model = load_adapter_model(
            path, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code,
            mask_token_id=mask_token_id, logits_shift=logits_shift, load_in_4bit=load_in_4bit,
        )
    if mask_token_id is not None and tokenizer.mask_token_id != model.config.mask_token_id:
        # An explicit mask id wins over the tokenizer's own mask token.
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(model.config.mask_token_id)
    _complete_tokenizer(tokenizer, model.config, path)
    if load_in_4bit:
        settle(model)
    return model, tokenizer


def _model_folder(name: str, trust_remote_code: bool) -> Path:
    """The folder a model name that is not a preset means: a local folder, else a hub id's local snapshot."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"model path {name} is a file; expected a folder with config.json")
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_local:
        raise UserError(f"model folder {name} does not exist")
    return hub_folder(name, trust_remote_code=trust_remote_code)


def _read_config(path: Path, name: str) -> dict:
    """The folder's config.json, or a one-line error (naming the preset a folder of its name shadows)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        shadows = f"; it shadows the preset {name!r} (run from another folder)" if name in PRESETS else ""
        raise UserError(f"{path}: no config.json (not a model folder){shadows}")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_file}: unreadable JSON ({exc})") from None


def _load_llada(path: Path, torch_dtype, device, load_in_4bit: bool) -> LLaDAModelLM:
    """A native LLaDA checkpoint (no remote code, whatever ``auto_map`` says), in eval mode."""
    # LLaDA's head is "ff_out" like every block's down projection: name it by its full path.
    kwargs = pretrained_kwargs(torch_dtype, device, load_in_4bit, skip_modules=["model.transformer.ff_out"])
    try:
        return LLaDAModelLM.from_pretrained(path, **kwargs).eval()
    except ValueError as exc:
        raise UserError(f"{path}: cannot load LLaDA checkpoint: {str(exc).splitlines()[0]}") from None


def hub_folder(name: str, *, trust_remote_code: bool = False) -> Path:
    """The local snapshot of hub model ``name``: from the cache, or downloaded when network access is allowed."""
    from huggingface_hub import snapshot_download  # looked up at call time (the hub tests replace it)

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
    if trust_remote_code:
        patterns.append("*.py")  # the model's own code, only when the user allows running it
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; each is one line here
        if offline:
            raise UserError(
                f"model {name!r} not found locally and hub downloads are not available offline "
                f"(use a preset: {', '.join(sorted(PRESETS))}, or a local folder; pass --online, or set "
                "LLDM_DPO_ONLINE=1, to download it)"
            ) from None
        raise UserError(f"model {name!r}: cannot fetch it from the hub ({type(exc).__name__}: {exc})") from None


def _require_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise UserError(
            f"{path}: weights only in pickle files ({', '.join(pickles[:3])}); these can run code when loaded "
            "and are refused: convert them to safetensors"
        )
    raise UserError(f"{path}: no *.safetensors weight files")


def _load_tokenizer(path: Path, trust_remote_code: bool):
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise UserError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load tokenizer: {str(exc).splitlines()[0]}") from None


def _complete_tokenizer(tokenizer, config, path: Path) -> None:
    """Fill mask/pad/eos tokens and the chat template from the model config where the tokenizer lacks them.

    LLaDA's published tokenizer config names no mask token (id 126336 lives in
    config.json); a Base checkpoint ships no chat template.
    """
    for attr in ("mask", "eos", "pad"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if getattr(tokenizer, f"{attr}_token", None) is None and isinstance(token_id, int):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if token is not None:
                setattr(tokenizer, f"{attr}_token", token)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != config.mask_token_id:
        raise UserError(
            f"{path}: tokenizer mask token id {tokenizer.mask_token_id} differs from config.json "
            f"mask_token_id {config.mask_token_id}"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        vocab = tokenizer.get_vocab()
        if all(tok in vocab for tok in (START_HEADER, END_HEADER, EOT)):
            tokenizer.chat_template = CHAT_TEMPLATE


# -- identities for cache fingerprints ---------------------------------------------

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:  # weights are large: hashed once per (path, size, mtime) in a process
        _FILE_HASHES[key] = file_sha256(path, block=1 << 24)
    return _FILE_HASHES[key]


def _config_hash(config: dict) -> str:
    config.pop("transformers_version", None)  # written by whichever version saved it
    return content_digest(config)


def _weight_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def model_identity(model_dir_or_name) -> dict:
    """What determines a model's outputs: config hash + weight-file hashes (or preset recipe).

    Accepts a preset name, a model folder, or an in-memory nn.Module (hashes
    its state dict; a PeftModel includes its adapter weights).
    """
    if isinstance(model_dir_or_name, nn.Module):
        return _module_identity(model_dir_or_name)
    name = str(model_dir_or_name)
    path = Path(name).expanduser()
    if is_preset(name):
        return {
            "kind": "preset",
            "name": name,
            "config_sha256": _config_hash(preset_config(name).to_dict()),
            "weights": (f"preset:{name}:sha256={PRESETS[name].weights_sha256}" if PRESETS[name].weights
                        else f"preset:{name}:seed={PRESETS[name].seed}:v{PRESET_VERSION}"),
        }
    if not path.exists() and "/" in name and not name.startswith((".", "/", "~")):
        path = hub_folder(name)
    if (path / LORA_ADAPTER_CONFIG).is_file():
        # An adapter's outputs depend on its own weights and on its base model's.
        adapter = json.loads((path / LORA_ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return {"kind": "lora", "config_sha256": content_digest(adapter),
                "weights": _weight_hashes(path),
                "base": model_identity(adapter.get("base_model_name_or_path") or "")}
    config_file = path / "config.json"
    if not config_file.is_file():
        if name in PRESETS:  # a folder of the preset's name is in the way (a local folder wins over a preset)
            raise UserError(f"model {name!r}: the folder {path.resolve()} (no config.json) shadows the preset of "
                            f"that name; run from another folder or name the model folder")
        raise UserError(f"model {name!r}: not a preset and no config.json there")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return {"kind": "folder", "config_sha256": _config_hash(config), "weights": _weight_hashes(path)}


def _module_identity(model: nn.Module) -> dict:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else {}
    return {"kind": "module", "config_sha256": _config_hash(cfg), "weights": h.hexdigest()}


def tokenizer_identity(tokenizer) -> str:
    """sha256 of the vocabulary/merges/added tokens, special tokens and chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # Runtime settings, not part of what the tokenizer is.
    backend.pop("truncation", None)
    backend.pop("padding", None)
    specials = {attr: getattr(tokenizer, attr, None)
                for attr in ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")}
    chat_template = getattr(tokenizer, "chat_template", None)
    return content_digest({"backend": backend, "specials": specials, "chat_template": chat_template})
