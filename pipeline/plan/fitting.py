"""The train recipes that fit, each as ready commands: ``lldm-dpo train`` with the recipe's flags over the user's
own options, and the ``lldm-dpo plan train`` that checks it."""

from __future__ import annotations

from typing import Any


def fitting_recipes(stage_cfg, shape, plan, device_bytes: int, device: str, *, verify: bool,
                    options: dict[str, Any], samples: int, prompt_length: int, world_size: int,
                    gpu_memory: str) -> tuple[list[dict[str, Any]], str]:
    """The cheapest train recipes that fit (pipeline.plan.recipes), the first traced as this plan traces when
    ``verify``; each as the train command and the plan command that checks it. ``options``: the user's stage
    options in our names; ``samples``, ``prompt_length``, ``world_size``, ``gpu_memory``: the plan's own flags
    as given (0 or 1: not given)."""
    from pipeline.plan import recipes

    found, method = recipes.search(stage_cfg, shape, plan, device_bytes, plan.reserve)
    if found and verify:
        recipes.verify(stage_cfg, shape, found[0], device_bytes, device, plan.reserve)
        method += "; the first traced as plan traces any setting"
    out = []
    for recipe in found:
        mine = recipes.flags(recipe.changes, None)  # train's flags; a shorter max length is score-ref's
        given = option_flags({k: getattr(stage_cfg, k, v) for k, v in options.items()},
                             set(recipe.changes) | {"model"})
        train = " ".join(["lldm-dpo train", *(["--model", str(stage_cfg.model)]), *given, *mine])
        shape_flags = [*(["--samples", str(samples)] if samples else []),
                       "--max-length", str(recipe.max_length),
                       *(["--prompt-length", str(prompt_length)] if prompt_length else []),
                       *(["--world-size", str(world_size)] if world_size > 1 else [])]
        check = " ".join(["lldm-dpo plan train", "--model", str(stage_cfg.model), *given, *mine, *shape_flags,
                          "--gpu-memory", str(gpu_memory)])
        out.append({"changes": recipe.changes, "max_length": recipe.max_length, "cost": recipe.cost,
                    "estimate": recipe.estimate, "total": recipe.total, "command": train, "plan_command": check})
    return out, method


def option_flags(options: dict[str, Any], skip: set[str]) -> list[str]:
    """The user's own stage options as flags (those a recipe changes left out)."""
    out = []
    for key, value in options.items():
        if key in skip or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out
