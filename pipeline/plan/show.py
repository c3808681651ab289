"""A plan as the terminal shows it: its peak by component, whether it fits, and what to change when not."""

from __future__ import annotations


def print_plan(plan) -> None:
    """The plan's components and total, whether it fits, the largest settings found and the recipes that fit,
    each a ready command."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.plan.memory import fmt_bytes

    console = Console()
    table = Table(title=f"plan {plan.stage} on {plan.device}", title_justify="left")
    table.add_column("component")
    table.add_column("peak", justify="right")
    for key, value in plan.components.items():
        table.add_row(key.replace("_", " "), fmt_bytes(value))
    table.add_row("[bold]total[/bold]", f"[bold]{fmt_bytes(plan.total)}[/bold]")
    console.print(table)
    verdict = "fits" if plan.fits else "does NOT fit"
    console.print(f"{verdict}: {fmt_bytes(plan.total)} of {fmt_bytes(plan.device_bytes)} "
                  f"(left free {fmt_bytes(plan.headroom)}; the fit keeps {fmt_bytes(plan.reserve)} as headroom); "
                  "torch.cuda.max_memory_allocated ~ "
                  f"{fmt_bytes(plan.tracked_peak)}; {plan.method}; {plan.seconds:.1f} s")
    for name, found in plan.largest.items():
        value = found["value"]
        console.print(f"largest --{name.replace('_', '-')} that fits with the headroom kept: "
                      + ("none" if value is None else f"{value}{' (the limit searched)' if found['at_limit'] else ''}"))
    if plan.recipes:
        console.print(f"settings that fit {fmt_bytes(plan.device_bytes)} with the headroom kept, cheapest first "
                      "(what each gives up: rows in flight, then checkpointing, bf16, LoRA, 4-bit, max length):")
    elif plan.recipe_method:
        console.print("no recipe searched fits: more cards (--world-size) or a larger card")
    for i, recipe in enumerate(plan.recipes, 1):
        planned = (f"{fmt_bytes(recipe['total'])} planned" if recipe["total"] is not None
                   else f"about {fmt_bytes(recipe['estimate'])} (estimate)")
        note = (f"; pairs scored with score-ref --max-length {recipe['max_length']}"
                if recipe["max_length"] != plan.settings.get("max_length") else "")
        console.print(f"  {i}. {planned}{note}", markup=False)
        console.print(f"     {recipe['command']}", markup=False, soft_wrap=True)
    if plan.recipes:
        console.print(f"check: {plan.recipes[0]['plan_command']}", markup=False, soft_wrap=True)
        console.print(f"note: recipes searched on an {plan.recipe_method}", style="dim", markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", style="dim")
