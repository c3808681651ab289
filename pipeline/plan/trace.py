"""Run a stage's real step code on a model that allocates nothing, under torch's memory tracker.

The model is built on the ``meta`` device (no storage), adapted exactly as the
stage adapts it (LoRA, k-bit preparation, gradient checkpointing), and then
each parameter and buffer becomes a CPU *fake* tensor (shape, dtype and
device, no data). The step code runs outside the fake mode: its bookkeeping
(token ids, masks, batch plans, the sampler's schedule) stays real and small,
while everything computed from the weights is fake. ``torch.distributed.
_tools.mem_tracker.MemTracker`` follows every storage, fake or real, so its
peak is the step's peak as the caching allocator would see it before slack.

What differs on CUDA (stated in every plan's notes): attention kernels
(flash/memory-efficient SDPA keep no [S, S] scores; the CPU kernel's fake
shapes are those of the fused CPU kernel, also without them), cuBLAS
workspaces and the CUDA context (added analytically), allocator rounding and
fragmentation (a stated slack), and bitsandbytes' NF4 weights (a stand-in
module holding exactly the packed bytes and quantization constants of
``memory.nf4_bytes``, dequantizing to a transient compute-dtype weight per
call as bitsandbytes' matmul does).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils.weak import WeakIdKeyDictionary

from pipeline.core.devices import torch_dtype
from pipeline.core.errors import UserError
from pipeline.core.schemas import (
    IDS_COLUMNS,
    LEN_COLUMNS,
    MASK_COUNT_COLUMNS,
    PAIR_ID_COLUMN,
    REF_TERM_COLUMNS,
    SEED_COLUMNS,
    SIDES,
)
from pipeline.estimator.diffusion import elbo_terms, mask_seed, masked_request, sample_masks
from pipeline.estimator.replay import PairBatch
from pipeline.models import LORA_TARGET_MODULES
from pipeline.models.llada import LLaDAConfig, LLaDAModelLM
from pipeline.models.numerics import config_numerics, prepare_4bit
from pipeline.models.presets import PRESETS, _default_dtype, build_preset, preset_config
from pipeline.models.quant import quantize_linears, require_bitsandbytes, settle, state_tensors
from pipeline.plan.memory import nf4_bytes
from pipeline.sampling.args import SamplingArgs
from pipeline.sampling.sampler import generate
from pipeline.trainer import dpo_step
from pipeline.trainer.optim import make_optimizer
from pipeline.trainer.placement import Placement
from pipeline.trainer.policy import adapt_policy

# --- the tracker ---------------------------------------------------------------------


class PlanTracker(MemTracker):
    """MemTracker's device totals by category, plus the live bytes of vocabulary-wide tensors (logits
    chunks and their float32 copies and gradients) at the moment of the peak.

    Per-module snapshots are skipped: the scorer calls the model once per batch and the head once per
    chunk within one step, which MemTracker's module bookkeeping reads as a new iteration."""

    def __init__(self, vocab: int, world: int = 1):
        super().__init__()
        self.vocab = int(vocab)
        self.world = int(world)
        self._wide = WeakIdKeyDictionary()
        self.head_at_peak = 0
        self._planned_peak = -1
        self._planned_snap: dict[str, int] = {}

    def _pre_fw_hook(self, module, inputs):
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            return
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # MemTracker hooks every parameter's gradient; a frozen one (the base under LoRA) refuses hooks.
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for param in module.parameters():  # a real 4-bit weight's quantization constants are weights too
            state = getattr(param, "quant_state", None)
            for t in state_tensors(state) if state is not None else []:
                self._update_and_maybe_create_winfos(t, _MemRefType.BUFFER)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._grad_seen),
                        param.register_post_accumulate_grad_hook(lambda p: self._grad_seen(p.grad)))
        return sizes

    def _grad_seen(self, grad):
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _track(self, reftype, t):
        super()._track(reftype, t)
        if t.dim() >= 2 and self.vocab in (t.shape[-1], t.shape[-2]) and not isinstance(t, nn.Parameter):
            self._wide[t.untyped_storage()] = True

    def _update_peak_stats(self, peak_state) -> None:
        # The peak is taken of what one card holds when parameters, gradients and optimizer states are
        # sharded over ``world`` processes (FSDP); with world 1, of everything. Sharding moves the peak
        # (full fine-tuning peaks at the optimizer step on one card, in the backward pass on eight).
        sharded = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT)
        for snap in self._curr_mem_snap.values():
            whole = sum(v for k, v in snap.items() if k in sharded)
            held = snap[_TOTAL_KEY] - whole + whole / self.world
            if held > self._planned_peak:
                self._planned_peak = held
                self._planned_snap = dict(snap)
                self.head_at_peak = self._wide_bytes()

    def _wide_bytes(self) -> int:
        # Views of the head's weight are vocabulary-wide too; only activations and temporaries count here.
        infos = (self._WINFO.get(st, (None, None))[0] for st in list(self._wide.keys()))
        return sum(w.mem_consumed for w in infos
                   if w is not None and w.reftype in (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH))

    def peak(self) -> dict[str, int]:
        """The snapshot by category (unsharded bytes) at the moment one card's share peaked."""
        return {("total" if key == _TOTAL_KEY else key.name.lower()): int(value)
                for key, value in self._planned_snap.items()}


# --- models that allocate nothing ------------------------------------------------------


def model_config(name: str):
    """The LLaDAConfig of a preset or a LLaDA folder (a LoRA adapter folder: its base's), read without weights."""
    path = Path(str(name)).expanduser()
    if str(name) in PRESETS and not path.is_dir():
        return copy.deepcopy(_preset_config(str(name)))  # a copy: build_model sets its n_layers
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        return model_config(base)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"model {name!r}: not a preset and no config.json there (plan reads the config only)")
    data = json.loads(config_file.read_text(encoding="utf-8"))
    if data.get("model_type") != "llada":
        raise UserError(f"{config_file}: model_type {data.get('model_type')!r}; plan builds LLaDA-architecture "
                        "models (presets and folders with model_type llada)")
    return LLaDAConfig.from_dict(data)


@functools.lru_cache(maxsize=8)
def _preset_config(name: str):
    return preset_config(name)  # builds the preset's tokenizer for its vocabulary: a second, once per process


def build_model(name: str, dtype: str, *, fake: bool, layers: int | None = None):
    """LLaDA of ``name`` in ``dtype``: on ``meta`` when ``fake`` (nothing allocated), else real on the CPU
    (a preset only: what the tests compare the plan with). ``layers`` builds that many blocks instead."""
    if not fake:
        if layers is not None:
            raise ValueError("a real model is built with its own number of blocks")
        return build_preset(name, device="cpu", dtype=dtype)
    config = model_config(name)
    if layers is not None:
        config.n_layers = int(layers)
    with _default_dtype(torch_dtype(dtype)), torch.device("meta"):
        model = LLaDAModelLM(config)
    return model.eval()


class _Dequantized(torch.autograd.Function):
    """x @ W.T with W dequantized on the fly in forward and again in backward, keeping nothing of it:
    what bitsandbytes' MatMul4Bit does for a frozen 4-bit weight."""

    @staticmethod
    def forward(ctx, x, packed, layer):
        ctx.layer = layer
        # bitsandbytes' gemm_4bit keeps the float32 absmaxes it dequantized beside the weight through the matmul
        absmax, weight = layer.absmax(packed), layer.dequantize(packed, x.dtype)
        out = torch.nn.functional.linear(x, weight)
        del absmax
        return out

    @staticmethod
    def backward(ctx, grad):
        absmax = ctx.layer.absmax(ctx.layer.weight)  # freed once the weight is dequantized, as there
        w = ctx.layer.dequantize(ctx.layer.weight, grad.dtype)
        del absmax
        return grad @ w, None, None


class NF4Linear(nn.Linear):
    """Stand-in for ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization): ``weight`` is the packed
    uint8 [(n + 1) // 2, 1] as bitsandbytes stores it, ``quant_state`` the constants' bytes
    (``nf4_bytes`` minus the packed codes)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        numel = self.in_features * self.out_features
        packed = (numel + 1) // 2
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty((packed, 1), dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("quant_state", torch.empty(nf4_bytes(numel) - packed, dtype=torch.uint8, device=device))
        self.bias = None
        self.compute_dtype = compute_dtype

    def absmax(self, packed: torch.Tensor) -> torch.Tensor:
        """The transient float32 absmax per block of 64 that double quantization is undone into."""
        return packed.new_empty((-(self.in_features * self.out_features // -64),), dtype=torch.float32)

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # new_empty follows the packed tensor (fake in a plan): a transient [out, in] weight per call.
        return packed.new_empty((self.out_features, self.in_features), dtype=dtype)

    lora_wrapped = False
    """Set under a LoRA layer: peft's 4-bit LoRA layer clones the base layer's output (its plain one does not)."""

    def forward(self, x):
        # As Linear4bit: the input cast to the compute dtype, the output cast back to the input's dtype.
        out = _Dequantized.apply(x.to(self.compute_dtype), self.weight, self).to(x.dtype)
        return out.clone() if self.lora_wrapped else out


def quantize_standins(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the block projections (what a 4-bit load quantizes; head and embeddings stay) by NF4 stand-ins."""
    pattern = re.compile(LORA_TARGET_MODULES)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    for name in names:
        model.set_submodule(name, NF4Linear(model.get_submodule(name), compute_dtype))
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; peft reads it
    return len(names)


def quantize_4bit(model: nn.Module, fake: bool) -> int:
    """The block projections in 4-bit as a 4-bit load gives them: NF4 stand-ins on fake tensors, bitsandbytes'
    own Linear4bit on real ones (the tests and bench compare the two)."""
    if fake:
        return quantize_standins(model, torch.bfloat16)
    require_bitsandbytes("cpu")
    count = quantize_linears(model, torch.bfloat16)
    settle(model)
    return count


def materialize(model: nn.Module, fake_mode) -> None:
    """Every meta parameter and buffer becomes a CPU fake tensor of the same shape, dtype and grad flag."""
    memo: dict[int, torch.Tensor] = {}

    def fake_like(t):
        if id(t) not in memo:
            with fake_mode:
                new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return memo[id(t)]

    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in list(tensors.items()):
                if t is not None and t.is_meta:
                    tensors[name] = fake_like(t)


def new_fake_mode():
    # Real inputs (token ids, masks) meet fake weights: they are lifted into the mode.
    return FakeTensorMode(allow_non_fake_inputs=True)


# --- synthetic work at the planned shapes -----------------------------------------------------


def synthetic_rows(pairs: int, prompt_len: int, response_len: int, samples: int, token: int) -> list[dict]:
    """Cache rows as score-ref writes them (seeds, mask counts, reference terms), every pair at the planned
    lengths; token values do not change memory, the masks' counts (from the real sampler) do."""
    rows = []
    for i in range(pairs):
        pid = f"plan-{i}"
        row = {PAIR_ID_COLUMN: pid, IDS_COLUMNS["prompt"]: [token] * prompt_len, LEN_COLUMNS["prompt"]: prompt_len}
        for side in SIDES:
            seed = mask_seed(0, pid, side, 0)
            row[IDS_COLUMNS[side]] = [token] * response_len
            row[LEN_COLUMNS[side]] = response_len
            row[SEED_COLUMNS[side]] = [seed]
            row[MASK_COUNT_COLUMNS[side]] = [sample_masks(response_len, samples, seed).counts.tolist()]
            row[REF_TERM_COLUMNS[side]] = [[-float(response_len)] * samples]
        rows.append(row)
    return rows


def plain_token(config) -> int:
    """A token id that is none of the special ones."""
    specials = {getattr(config, k, None) for k in ("mask_token_id", "pad_token_id", "eos_token_id")}
    return next(t for t in range(10, 10 + len(specials) + 1) if t not in specials)


@dataclass
class Shape:
    """The work one planned step does; what the stage's config does not say itself."""

    samples: int
    """Monte Carlo samples n per response."""
    max_length: int
    """Prompt + response tokens of every planned sequence (the worst case: all pairs at the limit)."""
    prompt_length: int
    """Prompt tokens within max_length (generate: the prompt, to which gen_length is added)."""
    world_size: int = 1
    """FSDP processes sharding parameters, gradients and optimizer states (1 = one card, no sharding)."""

    @property
    def response_length(self) -> int:
        return self.max_length - self.prompt_length


@dataclass
class Trace:
    peak: dict[str, int]
    """MemTracker's peak snapshot by category (param, buffer, grad, act, temp, opt, oth, total)."""
    head_at_peak: int
    """Live bytes of vocabulary-wide tensors at the peak."""
    trainable_bytes: int = 0
    frozen_bytes: int = 0
    block_bytes: int = 0
    """Parameter bytes of one transformer block (FSDP gathers blocks one or two at a time)."""
    head_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _param_bytes(model: nn.Module) -> tuple[int, int]:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    sizes = [(t.numel() * t.element_size(), t.requires_grad) for t in tensors]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, trainable in sizes if not trainable)


def _block_sizes(model: nn.Module) -> tuple[int, int]:
    block = max((sum(p.numel() * p.element_size() for p in module.parameters())
                 for name, module in model.named_modules() if re.search(r"blocks\.\d+$", name)), default=0)
    head = 0
    for name, p in model.named_parameters():
        if name.endswith("transformer.ff_out.weight") and ".blocks." not in name:
            head = p.numel() * p.element_size()
    return block, head


def _autocast(mixed_precision: str):
    if mixed_precision in ("bf16", "fp16"):
        # CPU autocast in bf16 stands for CUDA's bf16/fp16 autocast: both cast to 2-byte types.
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PlanAccelerator:
    """What ``micro_step`` asks of accelerate's Accelerator in one process (device, autocast, backward,
    clipping), without touching accelerate's process-wide state, which a run planning itself at start
    (train on CUDA) has already set up for its own device."""

    device = torch.device("cpu")
    num_processes = 1

    def __init__(self, mixed_precision: str):
        self.mixed_precision = mixed_precision

    def autocast(self):
        return _autocast(self.mixed_precision)

    def backward(self, loss):
        loss.backward()  # fp16's loss scaling multiplies a scalar: no memory to speak of

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _finish(tracker: PlanTracker, model: nn.Module, notes: list[str], ref_model: nn.Module | None = None) -> Trace:
    trainable, frozen = _param_bytes(model)
    if ref_model is not None:
        frozen += _param_bytes(ref_model)[1]
    block, head = _block_sizes(model)
    return Trace(tracker.peak(), tracker.head_at_peak, trainable, frozen, block, head, notes)


# --- the stages' steps -------------------------------------------------------------------


def trace_score_ref(cfg, shape: Shape, *, fake: bool = True, layers: int | None = None) -> Trace:
    """One score-ref batch: ``elbo_terms`` over the rows one forward pass of ``batch_tokens`` holds."""
    load_in_4bit = bool(getattr(cfg, "load_in_4bit", False))
    model = build_model(cfg.model, "bfloat16" if load_in_4bit else cfg.dtype, fake=fake, layers=layers)
    if load_in_4bit:
        quantize_4bit(model, fake)
        model = prepare_4bit(model)  # as pipeline.models.load prepares the 4-bit reference
    model.eval().requires_grad_(False)
    if fake:
        materialize(model, new_fake_mode())
    config = model.config
    token = plain_token(config)
    rows = max(1, cfg.batch_tokens // shape.max_length)
    requests = [masked_request([token] * shape.prompt_length, [token] * shape.response_length, cfg.samples,
                               1000 + i)[0] for i in range((rows + cfg.samples - 1) // cfg.samples)]
    tracker = PlanTracker(config.padded_vocab_size, shape.world_size)
    tracker.track_external(model)
    with tracker, torch.no_grad(), _autocast(getattr(cfg, "mixed_precision", "no")):
        elbo_terms(model, requests, mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id,
                   batch_tokens=cfg.batch_tokens)
    return _finish(tracker, model, [])


def default_numerics(cfg):
    """A train config with its unset numerics set: train takes them from its cache; without one (a plan), the
    defaults a cache records by default."""
    if cfg.dtype is None or cfg.mixed_precision is None or cfg.load_in_4bit is None:
        numerics = config_numerics(cfg)
        cfg = dataclasses.replace(cfg, dtype=numerics.dtype, mixed_precision=numerics.mixed_precision,
                                  load_in_4bit=numerics.load_in_4bit)
    return cfg


def trace_train(cfg, shape: Shape, *, fake: bool = True, layers: int | None = None) -> Trace:
    """One optimizer step of the DPO recipe as its loop runs it (micro_step per micro-batch, clipping,
    AdamW, zero_grad), with AdamW's states created beforehand as its first step creates them, so the
    step is a steady-state one: forward and backward run beside the optimizer states."""
    cfg = default_numerics(cfg)
    notes = []
    model = build_model(cfg.model, "bfloat16" if cfg.load_in_4bit else cfg.dtype, fake=fake, layers=layers)
    if cfg.load_in_4bit:
        quantize_4bit(model, fake)
    config = model.config
    torch.manual_seed(cfg.seed)
    policy = adapt_policy(model, cfg)
    for module in policy.modules() if cfg.load_in_4bit else ():
        if isinstance(getattr(module, "base_layer", None), NF4Linear):
            module.base_layer.lora_wrapped = True  # see NF4Linear.lora_wrapped
    fake_mode = new_fake_mode() if fake else None
    if fake:
        materialize(policy, fake_mode)
    ref_model = None
    if cfg.reference == "online" and cfg.lora_r == 0:
        ref_model = build_model(cfg.model, cfg.dtype, fake=fake, layers=layers).requires_grad_(False)
        if fake:
            materialize(ref_model, fake_mode)
    if cfg.mixed_precision == "fp16":  # _autocast traces it as bf16
        notes.append("fp16 autocast traced as bf16 autocast on the CPU (same 2-byte activations); "
                     "the fp16 loss scaler's few scalars are not counted")
    acc = PlanAccelerator(cfg.mixed_precision)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    prime_adamw(optimizer)
    tok = SimpleNamespace(mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id)
    fp = {"samples": shape.samples, "draws": 1, "scheme": "l_over_L", "eps": None}
    batch = PairBatch(synthetic_rows(cfg.batch_size, shape.prompt_length, shape.response_length, shape.samples,
                                     plain_token(config)), 0)
    ctx = dpo_step.TrainContext(cfg, Placement(acc, policy), tok, fp, ref_model)
    tracker = PlanTracker(config.padded_vocab_size, shape.world_size)
    tracker.track_external(*(m for m in (policy, optimizer, ref_model) if m is not None))
    accum = min(cfg.grad_accum, 2)  # gradients accumulate in place: a third micro-batch peaks as the second
    # The finite-loss check reads a value, which fake tensors do not have; it allocates a scalar only.
    no_value_reads = mock.patch.object(dpo_step, "_check_finite", lambda *a, **k: None)
    with tracker, (no_value_reads if fake else contextlib.nullcontext()):
        for micro in range(accum):
            dpo_step.micro_step(ctx, batch, 1.0 / cfg.grad_accum, sync=micro == accum - 1)
        acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _finish(tracker, policy, notes, ref_model)


def prime_adamw(optimizer) -> None:
    """Create AdamW's per-parameter states (step, exp_avg, exp_avg_sq) as its first ``step`` does, so one
    traced step shows the steady state; other optimizers are left to create theirs in the traced step."""
    if type(optimizer).__name__ not in ("AdamW", "Adam") or optimizer.defaults.get("amsgrad"):
        return
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                step_device = p.device if fused or group.get("capturable") else "cpu"
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=step_device)
                                      if not fused else p.new_zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def trace_generate(cfg, shape: Shape, *, fake: bool = True, layers: int | None = None) -> Trace:
    """The sampler over ``batch_size`` prompts, one step per block (every step has the same shapes)."""
    model = build_model(cfg.model, cfg.dtype, fake=fake, layers=layers)
    model.eval().requires_grad_(False)
    if fake:
        materialize(model, new_fake_mode())
    config = model.config
    token = plain_token(config)
    tracker = PlanTracker(config.padded_vocab_size, shape.world_size)
    tracker.track_external(model)
    with tracker:
        # one step per block, on the exact path (no KV cache, no threshold)
        args = SamplingArgs.of(cfg, steps=cfg.gen_length // cfg.block_length, kv_cache="none", threshold=None)
        generate(model, [[token] * shape.prompt_length] * cfg.batch_size, args, mask_token_id=config.mask_token_id,
                 pad_token_id=config.pad_token_id,
                 generator=[torch.Generator().manual_seed(i) for i in range(cfg.batch_size)])
    return _finish(tracker, model, ["one sampling step per block traced: every step of a block has the "
                                    "same shapes, so the peak is that of any step"])


TRACERS: dict[str, Callable[..., Trace]] = {"score-ref": trace_score_ref, "train": trace_train,
                                            "generate": trace_generate}
