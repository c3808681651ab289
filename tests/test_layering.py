"""The layout's promise: the library (pipeline/) never imports a command module, statically or by name, and
stages never import each other (they share helpers through pipeline/). ``run``, ``plan`` and the command line
(stages/cli.py) are the modules that compose stages."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSERS = {"stages.run_all", "stages.run_rounds", "stages.plan", "stages.cli"}
"""Modules whose job is to compose other stages: ``lldm-dpo run`` runs them in order, ``plan`` runs their step
code on fake tensors, the command line registers each stage's command."""
STAGE_NAME = re.compile(r"stages(\.\w+)*(:\w+)?")
"""A string that names a stage module (``stages.train``, ``stages.train:command``): an import by name."""
DYNAMIC_IMPORTS = {"import_module", "__import__", "find_spec", "import_string"}


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


def _by_name(path: Path) -> list[str]:
    """Imports by name: strings naming a stage module, and dynamic imports of a name not written out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and STAGE_NAME.fullmatch(node.value):
            found.append((node.lineno, f"names {node.value!r} (line {node.lineno})"))
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in DYNAMIC_IMPORTS and not (node.args and isinstance(node.args[0], ast.Constant)):
                found.append((node.lineno, f"imports by a computed name via {called} (line {node.lineno})"))
    return [what for _, what in sorted(found)]


def library_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        for name in sorted(_imports(path)):
            if name == "stages" or name.startswith("stages."):
                bad.append(f"{path.relative_to(root)} imports {name}")
        bad += [f"{path.relative_to(root)} {what}" for what in _by_name(path)]
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


def test_the_library_check_catches_imports_by_name(tmp_path):
    # The three ways the library once reached the stages: a command index, a config table and a module loader.
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "index.py").write_text(
        'import importlib\nCOMMANDS = [("train", "stages.train:command")]\n'
        'def load(name):\n    return importlib.import_module(name)\n'
        'def stage():\n    return load("stages.train")\n'
        'def optional():\n    return importlib.util.find_spec("tensorboard")\n'  # a fixed third-party name: fine
        'DOC = "as stages.train runs it"\n')  # prose about a stage is not an import
    assert library_violations(tmp_path) == [
        "pipeline/index.py names 'stages.train:command' (line 2)",
        "pipeline/index.py imports by a computed name via import_module (line 4)",
        "pipeline/index.py names 'stages.train' (line 6)"]


def test_importing_the_library_changes_no_environment():
    # torch sets TORCHINDUCTOR_CACHE_DIR when transformers' model classes import dynamo: not ours to judge,
    # so the baseline is taken after the third-party imports.
    code = ("import os, torch, transformers; from transformers import PreTrainedModel; before = dict(os.environ)\n"
            "import pipeline, pipeline.config, pipeline.models, pipeline.stagecli, stages.cli\n"
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TQDM_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "[]"
