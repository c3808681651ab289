"""Facts about the repository that users and CI rely on."""

from __future__ import annotations

import ast
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


LONGEST_FUNCTION = 80
"""Lines a function may span (its signature, docstring and body): one screen, one job."""


def long_functions(root: Path = ROOT, limit: int = LONGEST_FUNCTION) -> list[str]:
    """Functions in pipeline/, stages/, bench/ and scripts/ longer than ``limit`` lines."""
    found = []
    for folder in ("pipeline", "stages", "bench", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} is {lines} lines")
    return found


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []


def test_the_length_check_catches_a_long_function(tmp_path):
    (tmp_path / "stages").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    (tmp_path / "stages" / "long.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path) == ["stages/long.py:5 long is 81 lines"]


FILE_MENTION = re.compile(r"(?<![\w./-])((?:pipeline|stages|tests|bench|scripts|docs)/[\w./-]*?\w"
                          r"\.(?:py|md|yaml|yml|sql|jsonl|json|safetensors|sh))(?![\w.])")
"""A code or docs file of the repository named in prose: ``pipeline/core/atomic.py``, ``docs/estimator.md`` (data
files are left out: ``data/sft.jsonl`` in an example is the user's)."""


def missing_mentions(root: Path = ROOT) -> list[str]:
    """Files named in the library's, the stages', the benches' and the scripts' docstrings and comments and in the
    project's Markdown that do not exist (relative to the repository, or to pipeline/ as ARCHITECTURE.md names
    them). A name with a placeholder in capitals (``stages/NAME.py``) is a pattern, not a file."""
    sources = [p for folder in ("pipeline", "stages", "bench", "scripts") for p in sorted((root / folder).rglob("*.py"))]
    sources += [p for p in (root / "README.md", root / "ARCHITECTURE.md") if p.exists()]
    sources += sorted((root / "docs").rglob("*.md")) if (root / "docs").exists() else []
    missing = []
    for path in sources:
        for mention in sorted(set(FILE_MENTION.findall(path.read_text(encoding="utf-8")))):
            if re.search(r"/[A-Z_]+\.", mention) or "/out/" in mention:
                continue
            if not ((root / mention).exists() or (root / "pipeline" / mention).exists()):
                missing.append(f"{path.relative_to(root)} names {mention}, which does not exist")
    return missing


def test_the_files_the_docs_name_exist():
    assert missing_mentions() == []


def test_the_mention_check_catches_a_moved_file(tmp_path):
    (tmp_path / "pipeline" / "core").mkdir(parents=True)
    (tmp_path / "pipeline" / "core" / "atomic.py").write_text('"""See pipeline/core/atomic.py and pipeline/atomic.py,\n'
                                                             'docs/estimator.md and stages/NAME.py."""\n')
    assert missing_mentions(tmp_path) == [
        "pipeline/core/atomic.py names docs/estimator.md, which does not exist",
        "pipeline/core/atomic.py names pipeline/atomic.py, which does not exist"]
