"""Facts about the repository that users and CI rely on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(pip install [^\n]+)\n```", text)


def test_readme_gives_the_run_and_test_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    run_cmd = [c for c in commands if c.endswith("lldm-dpo run")]
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(run_cmd) == 1 and len(test_cmd) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[0] in ci.splitlines()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_example_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert cfg.num_processes >= 2 and cfg.distributed_type.name in ("MULTI_GPU", "FSDP")
    if cfg.distributed_type.name == "FSDP":  # version 2, sharding LLaDA's blocks
        assert str(cfg.fsdp_config["fsdp_version"]) == "2"
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LLaDABlock"


def test_no_shared_data_copied_into_the_repo():
    shared = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not shared.exists():
        pytest.skip("../shared/data is absent")
    first_question = shared.read_text().splitlines()[0][:80]
    for path in (ROOT / "data").rglob("*"):
        if path.is_file():
            assert first_question not in path.read_text(errors="ignore"), path
