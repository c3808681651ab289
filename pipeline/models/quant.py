"""The 4-bit NF4 base (QLoRA) with bitsandbytes, on CUDA and on the CPU.

- ``require_bitsandbytes(device)``: the one-line errors of a 4-bit base that
  cannot run here (bitsandbytes missing or older than the first version whose
  CPU kernels this project runs: ``BNB_MIN_VERSION``; a device other than the
  CPU or CUDA).
- ``quantize_linears(model, compute_dtype)``: every block projection becomes a
  ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization, blocks of 64), in
  place; what ``from_pretrained(..., quantization_config=...)`` does to a
  folder, for a model already in memory (a preset). The embedding and the head
  stay as they are.
- ``settle(model)``: one computation path everywhere. bitsandbytes re-packs a
  4-bit weight on the first no-grad forward pass of an eval-mode layer on a CPU
  with AVX512-BF16 (another layout, bfloat16 absmax, a fused kernel); train's
  layers never take that path, so score-ref and eval would compute otherwise
  than train, and on another CPU otherwise again. It is turned off: every pass
  dequantizes the weight and multiplies in the compute dtype.
- ``weight_bytes(model)``: the bytes a loaded model holds: parameters, buffers
  and every tensor of the 4-bit quantization states, each storage once.
- ``dequantize_linears(model, dtype)``: the reverse, for ``merge``: each
  Linear4bit becomes an ``nn.Linear`` holding its dequantized weight.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pipeline.core.errors import UserError

BNB_MIN_VERSION = (0, 50, 2)
"""The first bitsandbytes whose CPU NF4 kernels (double-quantized quantize, dequantize, matmul forward and
backward) this project has run; the ``[quant]`` extra pins it."""
BLOCKSIZE = 64
"""Values per absmax block (bitsandbytes' default for 4-bit)."""


def _version_tuple(text: str) -> tuple[int, ...]:
    """The leading number of each of the first three dot-separated parts (0 where a part has none)."""
    return tuple(int(m.group(0)) if (m := re.match(r"\d+", piece)) else 0 for piece in text.split(".")[:3])


def bitsandbytes_problem() -> str | None:
    """Why a 4-bit base cannot run in this environment (bitsandbytes missing or too old), or None."""
    need = ".".join(map(str, BNB_MIN_VERSION))
    try:
        import bitsandbytes
    except ImportError:
        return f"--load-in-4bit needs bitsandbytes >= {need}: pip install 'lldm-dpo[quant]'"
    except Exception as exc:  # noqa: BLE001 - a broken install fails in its own ways; each is one line here
        return f"--load-in-4bit: bitsandbytes does not import ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    found = getattr(bitsandbytes, "__version__", "0")
    if _version_tuple(found) < BNB_MIN_VERSION:
        return (f"--load-in-4bit needs bitsandbytes >= {need} (its CPU NF4 kernels), found {found}: "
                "pip install 'lldm-dpo[quant]'")
    return None


def require_bitsandbytes(device) -> None:
    """Stop with one line when a 4-bit base cannot run on ``device`` here."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--load-in-4bit runs on the CPU or CUDA (bitsandbytes kernels), not {kind}")
    problem = bitsandbytes_problem()
    if problem:
        raise UserError(problem)


def block_projections(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` block projections a 4-bit load quantizes (never the head)."""
    from pipeline.models import LORA_TARGET_MODULES

    pattern = re.compile(LORA_TARGET_MODULES)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every block projection with an NF4, double-quantized ``Linear4bit`` computing in
    ``compute_dtype``, in place; returns how many were replaced."""
    import bitsandbytes as bnb

    names = block_projections(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False, blocksize=BLOCKSIZE,
                                   compress_statistics=True, quant_type="nf4", module=layer)
        layer.weight = weight.to(device)  # .to() quantizes
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, layer)
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; peft reads it
    return len(names)


def linear4bit_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def settle(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer on the dequantize-and-multiply path (see the module's docstring)."""
    for _, module in linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = False
    return model


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of a bitsandbytes QuantState (absmax, code, offset) and of its nested state."""
    out = []
    while state is not None:
        out += [t for t in vars(state).values() if torch.is_tensor(t)]
        state = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and 4-bit quantization states, each storage once."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in list(model.parameters()):
        tensors += state_tensors(getattr(p, "quant_state", None))
    storages = {(s.data_ptr(), s.nbytes()) for s in (t.untyped_storage() for t in tensors)}
    return sum(nbytes for _, nbytes in storages)


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``Linear4bit`` (also inside a peft LoRA layer) with an ``nn.Linear`` holding its dequantized
    weight in ``dtype``, in place; returns how many were replaced."""
    import bitsandbytes.functional as bnbf

    modules = linear4bit_modules(model)
    for name, layer in modules:
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    for m in model.modules():
        if getattr(m, "is_loaded_in_4bit", False):
            m.is_loaded_in_4bit = False
    return len(modules)
