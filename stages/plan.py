"""``lldm-dpo plan STAGE``: will this stage's settings fit on my card, before I rent one.

The flags after STAGE are the stage's own (``--model``, ``--dtype``,
``--lora-r``, ``--load-in-4bit``, ``--batch-tokens``, ...: every field of its
config dataclass, so fields added to a stage are plannable at once), plus the
plan's: ``--gpu-memory`` (a size or a card name), ``--world-size`` (FSDP
processes sharding parameters, gradients and optimizer states), ``--samples``,
``--max-length`` and ``--prompt-length`` (the planned sequences). The estimate
runs the stage's real step on fake tensors (pipeline/plan).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.commands import emit_json
from pipeline.cli.loading import load_config
from pipeline.cli.stage_flags import parse_stage_flags
from pipeline.core.config import check_ranges, config_to_yaml, read_config_file, require
from pipeline.core.errors import ConfigError

STAGES = {"score-ref": ("stages.score_ref", "ScoreRefConfig"), "train": ("stages.train", "TrainConfig"),
          "generate": ("stages.generate", "GenerateConfig")}
"""The stages a plan covers: the module and name of each one's config dataclass."""


def stage_config_class(stage: str):
    """The config dataclass of a stage a plan covers: the plan takes the stage's own fields, so new ones flow
    through. (plan composes stages, as run does: it imports their configs and train's step code.)"""
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


RANGES = {"world_size": "[1, inf)", "samples": "[0, inf)", "max_length": "[0, inf)", "prompt_length": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class PlanConfig:
    stage: str = "train"
    """Stage to plan: score-ref, train or generate."""
    gpu_memory: str = "16GiB"
    """Accelerator memory: a size (16GiB, 24GB) or a card (rtx4080, rtx4090, a100-40, a100-80, h100, h200)."""
    world_size: int = 1
    """FSDP processes: parameters, gradients and optimizer states are sharded over them (1 = one card)."""
    samples: int = 0
    """Monte Carlo samples n per response (0: score-ref's --samples, else 8)."""
    max_length: int = 0
    """Prompt + response tokens of every planned sequence (0: score-ref's --max-length, else 1024; generate:
    prompt_length + gen_length)."""
    prompt_length: int = 0
    """Prompt tokens within max_length (0: a quarter of max_length; generate: 128)."""
    search: bool = True
    """Also find the largest batch tokens / sequence micro-batch / max length (generate: batch size) that fit; a
    train plan that does not fit: the cheapest recipes that do (LoRA, 4-bit, checkpointing, bf16, rows in flight,
    max length), each a ready command."""
    verify: bool = False
    """Trace the first recipe found, as plan traces any setting (its total then the plan's own; seconds to minutes
    on an 8B model, against the search's analytic estimate)."""
    options: dict = field(default_factory=dict)
    """The stage's own settings (its config's fields), as the stage takes them."""

    def __post_init__(self):
        from pipeline.plan import parse_memory

        check_ranges(self, RANGES)
        self.device_bytes, self.device = parse_memory(self.gpu_memory)
        self.stage_config = load_config(stage_config_class(self.stage), values=dict(self.options),
                                        origin=f"plan {self.stage} options")
        shape = self.shape()
        require(0 <= shape.prompt_length < shape.max_length,
                f"prompt_length {shape.prompt_length} must be below max_length {shape.max_length}")

    def shape(self):
        from pipeline.plan import Shape

        c = self.stage_config
        samples = self.samples or getattr(c, "samples", 8)
        if self.stage == "generate":
            prompt = self.prompt_length or 128
            return Shape(samples, prompt + c.gen_length, prompt, self.world_size)
        length = self.max_length or (c.max_length if self.stage == "score-ref" else 1024)
        return Shape(samples, length, self.prompt_length or length // 4, self.world_size)


def run(cfg: PlanConfig):
    """The plan of ``cfg.stage`` at its settings on ``cfg.gpu_memory``; with ``search``, the largest settings."""
    from pipeline.plan import largest, make_plan
    from pipeline.plan.trace import default_numerics

    stage_cfg, shape = cfg.stage_config, cfg.shape()
    if cfg.stage == "score-ref" and (stage_cfg.samples, stage_cfg.max_length) != (shape.samples, shape.max_length):
        stage_cfg = dataclasses.replace(stage_cfg, samples=shape.samples, max_length=shape.max_length)
    if cfg.stage == "train":
        stage_cfg = default_numerics(stage_cfg)
    plan = make_plan(cfg.stage, stage_cfg, shape, cfg.device_bytes, cfg.device)
    if cfg.search and cfg.stage == "train" and not plan.fits:
        from pipeline.cli.trl_names import translate
        from pipeline.plan.fitting import fitting_recipes

        options = translate(type(stage_cfg), dict(cfg.options), f"plan {cfg.stage} options")  # TRL's names as ours
        plan.recipes, plan.recipe_method = fitting_recipes(
            stage_cfg, shape, plan, cfg.device_bytes, cfg.device, verify=cfg.verify, options=options,
            samples=cfg.samples, prompt_length=cfg.prompt_length, world_size=cfg.world_size, gpu_memory=cfg.gpu_memory)
    elif cfg.search:
        plan.largest = largest(cfg.stage, stage_cfg, shape, cfg.device_bytes, plan.total)
    return plan


def command(
    ctx: typer.Context,
    stage: str = typer.Argument(..., help="score-ref, train or generate; then the stage's own options."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Size (16GiB) or card (rtx4080, h100, ...)."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="FSDP processes sharding the model."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Monte Carlo samples n per response."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Prompt + response tokens per sequence."),
    prompt_length: Optional[int] = typer.Option(None, "--prompt-length", help="Prompt tokens within max length."),
    search: Optional[bool] = typer.Option(None, "--search/--no-search", help="Find the largest settings that fit."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify", help="Trace the first recipe found."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Peak accelerator memory of a stage's settings, by component, and whether they fit."""
    cls = stage_config_class(stage)  # a ConfigError (a UserError: one line) for another stage
    options = parse_stage_flags(cls, list(ctx.args), stage, within="plan")
    if stage == "score-ref":  # the plan's --samples/--max-length are score-ref's own
        options.update({k: v for k, v in (("samples", samples), ("max_length", max_length)) if v is not None})
    flags = dict(stage=stage, gpu_memory=gpu_memory, world_size=world_size, samples=samples, max_length=max_length,
                 prompt_length=prompt_length, search=search, verify=verify)
    from_file = read_config_file(config).get("options") or {} if config else {}
    if not isinstance(from_file, dict):
        raise ConfigError(f"{config}: options must be a mapping of {cls.__name__} fields")
    cfg = load_config(PlanConfig, config, {**flags, "options": {**from_file, **options}})
    if print_config:
        typer.echo(config_to_yaml(cfg, with_docs=True), nl=False)
        return
    plan = run(cfg)
    if as_json:
        emit_json(dataclasses.asdict(plan))
    else:
        from pipeline.plan.show import print_plan

        print_plan(plan)


command.context_settings = {"allow_extra_args": True, "ignore_unknown_options": True}
