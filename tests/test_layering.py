"""The layout's promise: the library (pipeline/) never imports a command module, and stages never import
each other (they share helpers through pipeline/). ``run`` is the one command that composes stages."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSERS = {"stages.run_all", "stages.run_rounds"}
"""Commands whose job is to run other stages in order (``lldm-dpo run``)."""


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def library_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        for name in sorted(_imports(path)):
            if name == "stages" or name.startswith("stages.") or name == "pipeline.cli" or name.startswith("pipeline.cli."):
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def stage_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "stages").glob("*.py")):
        me = ".".join(path.relative_to(root).with_suffix("").parts)
        if me in COMPOSERS:
            continue
        for name in sorted(_imports(path)):
            parts = name.split(".")
            if parts[0] == "stages" and len(parts) > 1 and f"stages.{parts[1]}" != me and parts[1] != "__init__":
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def test_library_never_imports_a_command_module():
    assert library_violations() == []


def test_stages_never_import_each_other():
    assert stage_violations() == []


def test_the_checks_catch_a_violation(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "bad.py").write_text("def f():\n    from stages.train import run\n")
    (tmp_path / "stages" / "evaluate.py").write_text("from stages.generate import complete\n")
    (tmp_path / "stages" / "generate.py").write_text("import stages.generate\n")  # itself: fine
    assert library_violations(tmp_path) == ["pipeline/bad.py imports stages.train",
                                            "pipeline/bad.py imports stages.train.run"]
    assert stage_violations(tmp_path) == ["stages/evaluate.py imports stages.generate",
                                          "stages/evaluate.py imports stages.generate.complete"]


def test_importing_the_library_changes_no_environment():
    # torch sets TORCHINDUCTOR_CACHE_DIR when transformers' model classes import dynamo: not ours to judge,
    # so the baseline is taken after the third-party imports.
    code = ("import os, torch, transformers; from transformers import PreTrainedModel; before = dict(os.environ)\n"
            "import pipeline, pipeline.config, pipeline.models, pipeline.stagecli, pipeline.cli\n"
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TQDM_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "[]"
