"""Named models built locally from a config with a fixed seed (no download).

- ``skill``: a ~1.2M-parameter LLaDA trained by ``scripts/train_skilled_model.py``
  on the project's own short arithmetic word problems (``scripts/make_skill_data.py``):
  it gets some of them right (see ``weights/skill.json``), the starting model of the
  embedded default of ``lldm-dpo run``. Its weights ship in the package
  (``weights/skill.safetensors``, bfloat16) and are checked against the sha256
  recorded here before use.
- ``tiny``: a ~3.7M-parameter LLaDA with random weights.
- ``micro``: a ~0.15M-parameter LLaDA with grouped-query attention, for fast tests.
- ``llada-8b-shape``: LLaDA-8B's exact shape (8,015,581,184 parameters), random
  weights, for GPU benchmarks.  Built directly on the target device (or
  ``meta``) in the target dtype, so it never needs 32 GB of host memory.

Every preset uses the built-in tokenizer (pipeline/models/tokenizer.py); its
special token ids are written into the model config so that
``model.config.mask_token_id == tokenizer.mask_token_id``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.core.atomic import file_sha256
from pipeline.core.devices import torch_dtype as _torch_dtype
from pipeline.core.errors import UserError
from pipeline.models.llada import LLaDAConfig, LLaDAModelLM
from pipeline.models.tokenizer import build_tokenizer

# Bump when preset construction changes the weights a (name, seed) produces:
# model_identity() of a preset includes it, so caches keyed on it go stale.
PRESET_VERSION = 1


WEIGHTS_DIR = Path(__file__).with_name("weights")


@dataclass(frozen=True)
class Preset:
    description: str
    config: dict = field(default_factory=dict)
    seed: int = 0
    tokenizer_layout: str = "compact"
    weights: str | None = None
    """File in WEIGHTS_DIR with trained weights (safetensors); None: random weights from ``seed``."""
    weights_sha256: str | None = None
    """sha256 of that file, checked before the weights are used."""


PRESETS: dict[str, Preset] = {
    "skill": Preset(
        description="~1.2M-parameter LLaDA (4 layers, d_model 128) trained on short arithmetic word problems, "
                    "the embedded default",
        config=dict(
            d_model=128, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=512,
            vocab_size=512, embedding_size=512, max_sequence_length=256,
        ),
        weights="skill.safetensors",
        weights_sha256="55e9225d41ee2b8dea7e636a0f82532da64f629c972d639d4c9dfc5a8118f03f",
    ),
    "tiny": Preset(
        description="~3.7M-parameter LLaDA (4 layers, d_model 256), random weights",
        config=dict(
            d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=768,
            vocab_size=512, embedding_size=512, max_sequence_length=2048,
        ),
    ),
    "micro": Preset(
        description="~0.15M-parameter LLaDA (2 layers, d_model 64, GQA 4/2) for fast tests",
        config=dict(
            d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128,
            vocab_size=512, embedding_size=512, max_sequence_length=1024,
        ),
    ),
    "llada-8b-shape": Preset(
        description="LLaDA-8B's exact config and shape (8.02e9 parameters), random weights",
        config=dict(),  # LLaDAConfig's defaults are LLaDA-8B's config.json
        tokenizer_layout="llada",
    ),
}


def is_preset(name) -> bool:
    """Whether ``name`` means a preset: a preset's name, not shadowed by a folder of that name (a local folder
    wins)."""
    return str(name) in PRESETS and not Path(str(name)).expanduser().is_dir()


def preset_tokenizer(name: str):
    """The tokenizer that goes with preset ``name``."""
    return build_tokenizer(layout=_get(name).tokenizer_layout)


def preset_config(name: str) -> LLaDAConfig:
    """The LLaDAConfig of preset ``name``, special ids taken from its tokenizer."""
    tok = preset_tokenizer(name)
    return LLaDAConfig(**_get(name).config, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def build_preset(name: str, device="cpu", dtype="float32", seed: int | None = None) -> LLaDAModelLM:
    """Instantiate preset ``name`` directly on ``device`` in ``dtype`` with a fixed seed, in eval mode.

    On ``device="meta"`` nothing is allocated (shapes and parameter counts only).
    The global RNG is left untouched: initialisation runs under a forked RNG.
    """
    preset = _get(name)
    config = preset_config(name)
    torch_dtype = _torch_dtype(dtype)
    device = torch.device(device)
    seed = preset.seed if seed is None else seed
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices), _default_dtype(torch_dtype), device:
        torch.manual_seed(seed)  # every device's generator, CUDA's included
        # Parameters are created (and initialised) on the device in the target
        # dtype: no float32 host copy of an 8B model ever exists.
        model = LLaDAModelLM(config)
    if preset.weights is not None and device.type != "meta":
        state = {k: v.to(device=device, dtype=torch_dtype) for k, v in preset_weights(name).items()}
        model.load_state_dict(state, strict=True)
    return model.eval()


def preset_weights_path(name: str) -> Path:
    """The shipped weights file of a trained preset."""
    preset = _get(name)
    if preset.weights is None:
        raise UserError(f"preset {name!r} has no trained weights (random weights from its seed)")
    return WEIGHTS_DIR / preset.weights


@functools.lru_cache(maxsize=2)
def preset_weights(name: str) -> dict[str, torch.Tensor]:
    """The trained preset's state dict, read once its file's sha256 matches the recorded one."""
    from safetensors.torch import load_file

    path = preset_weights_path(name)
    if not path.is_file():
        raise UserError(f"preset {name!r}: weights file {path} is missing (reinstall the package, or retrain with "
                        "scripts/train_skilled_model.py)")
    digest = file_sha256(path)
    if digest != _get(name).weights_sha256:
        raise UserError(f"preset {name!r}: {path} has sha256 {digest}, the package records "
                        f"{_get(name).weights_sha256}; the file is damaged or not this version's")
    return load_file(str(path))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}") from None
