"""trainer.placement.Placement: the policy as placed, which a recipe is and a step reads (one scorer)."""

from __future__ import annotations

import contextlib

from pipeline.trainer.placement import Placement
from pipeline.trainer.session import Recipe


class _Acc:
    device = "cpu"

    def no_sync(self, wrapped):
        return ("no_sync", wrapped)


def test_the_scorer_is_the_wrapper_when_distributed_else_the_model():
    model, wrapper = object(), object()
    assert Placement(_Acc(), model).scorer is model
    assert Placement(_Acc(), model, wrapped=wrapper).scorer is wrapper
    assert Placement(_Acc(), model).most(3) == 3  # one process: no collective


def test_gradients_sync_only_on_the_last_backward_of_a_step_under_ddp():
    wrapper = object()
    ddp = Placement(_Acc(), object(), wrapped=wrapper)
    assert ddp.sync_context(last=False) == ("no_sync", wrapper)
    assert isinstance(ddp.sync_context(last=True), contextlib.nullcontext)
    fsdp = Placement(_Acc(), object(), wrapped=wrapper, fsdp=True)  # FSDP reduce-scatters every backward
    assert isinstance(fsdp.sync_context(last=False), contextlib.nullcontext)
    assert isinstance(Placement(_Acc(), object()).sync_context(last=False), contextlib.nullcontext)


def test_a_recipe_is_its_steps_placement():
    recipe = Recipe(cfg=None)
    assert isinstance(recipe, Placement) and recipe.wrapped is None and recipe.fsdp is False
    recipe.acc, recipe.model = _Acc(), object()
    assert recipe.scorer is recipe.model
