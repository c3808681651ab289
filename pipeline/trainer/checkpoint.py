"""Training checkpoints that are models, in transformers' layout: ``RUN/checkpoint-N`` (N the global step)
loads wherever ``--model`` is taken.

A checkpoint folder holds
- the model in Hugging Face form: a peft adapter folder under LoRA
  (``adapter_config.json`` + ``adapter_model.safetensors``), else a full
  checkpoint (``config.json`` + ``*.safetensors``), with the tokenizer files;
  so ``load_model(RUN/checkpoint-N)`` works and evaluation can pick any step;
- the training state: ``optimizer.pt`` (or, under FSDP, ``optimizer/``: one
  torch.distributed.checkpoint shard per process), ``scheduler.pt``,
  ``rng-RRRRR.pt`` per process, the run's recorded ``config.yaml`` (what a resume
  is checked against), ``lldm-dpo-state.json`` (the data layout and position a
  resume needs) and ``trainer_state.json``, written last: transformers'
  ``TrainerState`` (``global_step``, ``epoch``, ``log_history``, ``best_metric``,
  ``best_model_checkpoint``, ...; ``TrainerState.load_from_json`` reads it).

Under FSDP the model's shards are gathered into the consolidated files (the
adapter only, under LoRA), and each process writes its own optimizer shard; a
resume restores the weights from the consolidated files and the optimizer from
the shards, so it needs the same number of processes. The folder is built under
a temporary name and renamed when complete, so a run killed at any moment
leaves only whole checkpoints. Tensors are read back with safetensors or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import TrainerState

from pipeline.core.atomic import atomic_dir, is_owned, remove_owned
from pipeline.core.errors import UserError
from pipeline.core.paths import CHECKPOINT_PATTERN, CHECKPOINT_PREFIX, CONFIG_FILE, LEGACY_CHECKPOINTS_DIR, METRICS_FILE
from pipeline.trainer.metrics import read_metrics

LEGACY_STEP_PATTERN = re.compile(r"^step-(\d{7})$")
STATE = "trainer_state.json"
"""transformers' TrainerState, written last: a checkpoint folder without it is incomplete."""
RECORD = "lldm-dpo-state.json"
"""What a resume needs beyond TrainerState: the step, the data layout (with the data's fingerprint), processes."""
SHARDED_OPTIMIZER = "optimizer"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 has turned the model's parameters into DTensors."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _saved_keys(model) -> list[str]:
    """The tensors a checkpoint's model files hold: the adapter's under LoRA, every weight otherwise."""
    if _is_peft(model):
        return [n for n, p in model.named_parameters() if p.requires_grad]
    return list(model.state_dict().keys())


def gather_state(model, main: bool) -> dict[str, torch.Tensor] | None:
    """Under FSDP the saved tensors in full on CPU (a collective: every process calls it); None off main, and
    None when the model is not sharded (save_pretrained takes its own state dict)."""
    if not is_sharded(model):
        return None
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    out = {}
    for name in _saved_keys(model):
        t = tensors[name] if name in tensors else model.state_dict()[name]
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            out[name] = full.detach().to("cpu").contiguous().clone()
    return out if main else None


def save_model_files(folder: Path, model, tokenizer, state_dict: dict[str, torch.Tensor] | None,
                     base_name: str | None = None) -> None:
    """Write the model (adapter or full checkpoint) and tokenizer into an existing folder."""
    if _is_peft(model) and base_name is not None:
        base = Path(base_name)
        model.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.exists() else base_name
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(folder)


def save_model_dir(path: Path, model, tokenizer, accelerator, base_name: str | None = None,
                   card: str | None = None) -> None:
    """A consolidated model folder (RUN/final), with ``card`` as its README.md, renamed into place; every
    process must call it."""
    state = gather_state(model, accelerator.is_main_process)
    if accelerator.is_main_process:
        with atomic_dir(path, record=True) as tmp:
            save_model_files(tmp, model, tokenizer, state, base_name)
            if card is not None:
                (Path(tmp) / "README.md").write_text(card, encoding="utf-8")  # over peft's generic card
    accelerator.wait_for_everyone()


def _shared_tmp(stack: contextlib.ExitStack, final: Path, accelerator) -> Path:
    """The main process's ``atomic_dir`` for ``final`` (renamed and recorded when ``stack`` closes),
    its temporary name sent to every process so each can write its shard there."""
    name = [None]
    if accelerator.is_main_process:
        name[0] = str(stack.enter_context(atomic_dir(final, record=True)))
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``RUN_DIR/checkpoint-N`` (transformers' name)."""
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


def history_entries(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One metrics row as transformers' ``log_history`` holds it: the training entry (``loss``, ``grad_norm``,
    ``learning_rate``, ..., ``epoch``, ``step``) and, when the step was evaluated, a separate eval entry with
    transformers' ``eval_`` prefix (``eval/loss`` -> ``eval_loss``). Unmeasured (NaN) values are left out."""
    step, epoch = int(row["step"]), row.get("epoch")
    where = {"step": step, **({"epoch": epoch} if _finite(epoch) else {})}
    train = {k: v for k, v in row.items() if k not in ("step", "epoch") and not k.startswith("eval/") and _finite(v)}
    evals = {"eval_" + k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/") and _finite(v)}
    return [{**part, **where} for part in (train, evals) if part]


def log_history(run_dir: Path, upto: int) -> list[dict[str, Any]]:
    """``log_history`` up to step ``upto``: the run folder's metrics.parquet rows (flushed before each save)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [entry for row in read_metrics(path).to_pylist() if row["step"] <= upto for entry in history_entries(row)]


def trainer_state(step: int, state: Mapping[str, Any], cfg: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    """transformers' ``TrainerState`` of the checkpoint of ``step`` (its field names; unknown ones keep their
    defaults). ``state`` is the stage's record (``layout``, ``steps_per_epoch``, ``best_*``, ``num_tokens``),
    ``cfg`` its config (``log_every``, ``save_every``, ``eval_every``, ``batch_size``)."""
    layout = state.get("layout", {})
    max_steps = int(layout.get("total_steps", step))
    per_epoch = max(1, int(state.get("steps_per_epoch", max_steps) or 1))
    best = state.get("best_model_checkpoint")
    match = CHECKPOINT_PATTERN.match(Path(best).name) if best else None
    fields = {"epoch": float(state.get("epoch", step / per_epoch)), "global_step": step, "max_steps": max_steps,
              "logging_steps": int(getattr(cfg, "log_every", 1)), "eval_steps": int(getattr(cfg, "eval_every", 0)),
              "save_steps": int(getattr(cfg, "save_every", 0)),
              "train_batch_size": int(getattr(cfg, "batch_size", layout.get("batch_size", 1))),
              "num_train_epochs": math.ceil(max_steps / per_epoch),
              "num_input_tokens_seen": int(state.get("num_tokens", 0) or 0), "log_history": history,
              "best_metric": state.get("best_metric"), "best_model_checkpoint": best,
              "best_global_step": int(match.group(1)) if match else None}
    known = {f.name for f in dataclasses.fields(TrainerState)}
    return dataclasses.asdict(TrainerState(**{k: v for k, v in fields.items() if k in known}))


def save_checkpoint(run_dir: Path, step: int, *, model, wrapped, optimizer, scheduler, tokenizer, accelerator,
                    state: dict[str, Any], base_name: str | None = None, keep: int = 2,
                    protect: Sequence[Path] = (), cfg: Any = None) -> Path:
    """Write ``RUN/checkpoint-N`` (every process calls this); keep the ``keep`` newest (transformers'
    save_total_limit; 0 keeps all) and every ``protect``ed one (the best, with ``train --save-best``). Rotation
    removes only checkpoint folders this program recorded writing, and in them only its own files. ``cfg`` (the
    stage's config) fills TrainerState's logging_steps, save_steps, eval_steps and train_batch_size."""
    final = checkpoint_dir(run_dir, step)
    rank = accelerator.process_index
    with contextlib.ExitStack() as stack:
        tmp = _shared_tmp(stack, final, accelerator)
        sharded = is_sharded(model)
        weights = gather_state(model, accelerator.is_main_process)
        if sharded:
            dcp.save({"optimizer": get_optimizer_state_dict(wrapped, _inner(optimizer))},
                     checkpoint_id=str(tmp / SHARDED_OPTIMIZER))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng-{rank:05d}.pt")
        if accelerator.is_main_process:
            save_model_files(tmp, model, tokenizer, weights, base_name)
            if not sharded:
                torch.save(_inner(optimizer).state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record = {**state, "step": step, "processes": accelerator.num_processes, "sharded": sharded}
            recorded = Path(run_dir) / CONFIG_FILE
            if recorded.is_file():  # the run's identity, checked by a resume from this folder
                shutil.copyfile(recorded, tmp / CONFIG_FILE)
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
            hf_state = trainer_state(step, state, cfg, log_history(run_dir, step))
            (tmp / STATE).write_text(json.dumps(hf_state, indent=2, sort_keys=True) + "\n")
    # The main process's atomic_dir has renamed the folder into place (replacing an earlier checkpoint-N whole).
    if accelerator.is_main_process:
        kept = {Path(p).resolve() for p in protect}
        ours = [c for c in list_checkpoints(run_dir) if is_owned(c)]  # a user's checkpoint-N is not rotated
        for old in ours[:-keep] if keep > 0 else []:
            if old.resolve() not in kept:
                remove_owned(old)  # what the checkpoint wrote; a file the user put there stays
    accelerator.wait_for_everyone()
    return final


def _inner(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def is_complete(path: Path) -> bool:
    """A whole checkpoint of this layout: its record and, written last, trainer_state.json."""
    return (Path(path) / RECORD).is_file() and (Path(path) / STATE).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders in ``run_dir``, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def legacy_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of the layout before transformers' (``checkpoints/step-NNNNNNN``), which are not resumed."""
    root = Path(run_dir) / LEGACY_CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and LEGACY_STEP_PATTERN.match(p.name))


def legacy_error(path: Path) -> UserError:
    return UserError(f"{path}: a checkpoint of the layout before transformers' (checkpoints/step-N), which this "
                     "version does not resume; start a new run (--overwrite, or another --out), or train from its "
                     f"model (--model {path})")


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's resume record (``step``, ``layout``, ``processes``, ``best_*``, ...)."""
    path = Path(path)
    if not (path / RECORD).is_file():
        if (path / STATE).is_file() and LEGACY_STEP_PATTERN.match(path.name):
            raise legacy_error(path)
        raise UserError(f"{path}: not a checkpoint written by lldm-dpo train or sft (no {RECORD})")
    try:
        return json.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / RECORD}: does not read as JSON ({exc}); the checkpoint is damaged") from None


def check_world(path: Path, state: dict[str, Any], processes: int) -> None:
    """A sharded optimizer state only fits the number of processes that wrote it."""
    saved = int(state.get("processes", 1))
    if state.get("sharded") and saved != processes:
        raise UserError(f"{path}: the checkpoint's optimizer state is sharded over {saved} processes (FSDP) and "
                        f"this run has {processes}; resume with {saved} processes, or start a new run from the "
                        f"checkpoint's consolidated model (--model {path})")


def _read_model_files(path: Path, model) -> dict[str, torch.Tensor]:
    """The checkpoint's weights keyed by this model's parameter names."""
    if (path / "trainable.safetensors").is_file():
        raise UserError(f"{path}: a checkpoint of an earlier lldm-dpo version (trainable.safetensors); it cannot "
                        "be resumed by this one: start a new run")
    if _is_peft(model):
        file = path / ADAPTER_WEIGHTS
        if not file.is_file():
            raise UserError(f"{path}: no {ADAPTER_WEIGHTS}; the checkpoint was not written by a LoRA run "
                            "(resume with the run's own --lora-r)")
        saved = load_file(str(file))
        # peft stores adapter weights without the adapter's name ("lora_A.weight", not "lora_A.default.weight").
        names = {n.replace(".default", ""): n for n in _saved_keys(model)}
        return {names.get(k, k): v for k, v in saved.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files or (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{path}: no full model weights; the checkpoint was written by a LoRA run "
                        "(resume with its --lora-r)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


DATA_KEYS = {"scores_digest": "the reference cache of fingerprint", "data_sha256": "the examples of sha256"}
"""Layout keys that name the training data by content (train's cache, sft's examples)."""


def load_checkpoint(path: Path, *, layout: dict[str, Any], model, wrapped, optimizer, scheduler,
                    accelerator) -> dict[str, Any]:
    """Restore a checkpoint in place (every process calls this); returns its trainer state. It must have been
    written by a run of this world size and ``layout``: resuming must replay the same data order and schedule,
    so the settings that fix them must match."""
    path = Path(path)
    state = read_state(path)
    check_world(path, state, accelerator.num_processes)  # before the layout: its message says what to do instead
    saved = state.get("layout", {})
    diffs = [k for k in layout if k in saved and saved[k] != layout[k]]
    data = [k for k in DATA_KEYS if k in diffs]
    if data:  # other data: every count that follows from it (total_steps, ...) differs too, and says less
        k = data[0]
        raise UserError(f"{path}: cannot resume: the data differs (the checkpoint was trained on {DATA_KEYS[k]} "
                        f"{str(saved[k])[:12]}..., this run reads {str(layout[k])[:12]}...); resume with the run's "
                        "own data, or start afresh with --overwrite or another --out")
    if diffs:
        k = diffs[0]
        raise UserError(f"{path}: cannot resume with {k} = {layout[k]}; the run was started with {k} = {saved[k]} "
                        "(the data position and schedule depend on it)")
    weights = _read_model_files(path, model)
    expected = set(_saved_keys(model))
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        extra = sorted(set(weights) - expected)[:3]
        raise UserError(f"{path}: checkpoint does not match this model's trainable parameters "
                        f"(missing {missing}, unexpected {extra}); was it made with other LoRA settings?")
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, value in weights.items():
            target = tensors[name]
            if isinstance(target, DTensor):
                # Every process holds the whole file: cut its own shard, no communication.
                shard = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                          src_data_rank=None)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(value.to(target.device, target.dtype))
    if state.get("sharded"):
        holder = {"optimizer": get_optimizer_state_dict(wrapped, _inner(optimizer))}
        dcp.load(holder, checkpoint_id=str(path / SHARDED_OPTIMIZER))
        set_optimizer_state_dict(wrapped, _inner(optimizer), holder["optimizer"])
    else:
        _inner(optimizer).load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index:05d}.pt"
    rng = torch.load(rng_file if rng_file.is_file() else path / "rng-00000.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
