"""A composer's config in layers: sections add key by key, other keys replace; every section's keys checked."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.cli.loading import check_section_keys, merge_sections
from pipeline.core.errors import ConfigError


def test_a_section_adds_to_the_one_before_and_other_keys_replace():
    base = {"model": "tiny", "train": {"max_steps": 10, "batch_size": 4}, "eval": {"limit_task": 5}}
    merged = merge_sections(base, ("train", "eval"), {"model": "micro", "train": {"max_steps": 2}},
                            {"train": {"batch_size": 8}, "rounds": 1})
    assert merged == {"model": "micro", "train": {"max_steps": 2, "batch_size": 8}, "eval": {"limit_task": 5},
                      "rounds": 1}
    assert base["train"] == {"max_steps": 10, "batch_size": 4}  # the layers below are left as they were


@dataclass
class _Stage:
    max_steps: int = 1


def test_an_unknown_key_in_a_section_names_the_section_and_the_key():
    check_section_keys({"train": _Stage}, {"train": {"max_steps": 3}}, "run config")
    with pytest.raises(ConfigError, match=r"run config: train.*max_stepz"):
        check_section_keys({"train": _Stage}, {"train": {"max_stepz": 3}}, "run config")
