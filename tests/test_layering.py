"""The layout's promise (ARCHITECTURE.md): the library (pipeline/) never imports a command module, statically or by
name; stages never import each other (they share helpers through pipeline/; ``run``, ``plan`` and the command line
are the modules that compose stages); the library is sub-packages only, each importing only the packages below it
in ``LAYERS``; and no module imports itself back through others (no import circles). Imports inside functions
count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSERS = {"stages.run_all", "stages.run_rounds", "stages.run_stages", "stages.plan", "stages.cli"}
"""Modules whose job is to compose other stages: ``lldm-dpo run`` runs them in order, ``plan`` runs their step
code on fake tensors, the command line registers each stage's command."""
STAGE_NAME = re.compile(r"stages(\.\w+)+(:\w+)?|stages:\w+")
"""A string that names a stage module (``stages.train``, ``stages.train:command``): an import by name. The bare
word ``stages`` (a record's key, the package) names no module a stage defines."""
DYNAMIC_IMPORTS = {"import_module", "__import__", "find_spec", "import_string"}
LAYERS = ("core", "data", "grading", "models", "estimator", "refcache", "sampling", "evaluation", "trainer", "plan",
          "report", "query", "cli")
"""pipeline/'s sub-packages, lowest first: each may import its own package and those before it, never one after.
core: errors, atomic outputs, paths, schemas, config machinery; data: what users bring; grading: is an answer
right; models: LLaDA, presets, loading, numerics; estimator: masks, ELBO, replay, losses; refcache: the reference
cache; sampling: the sampler, completions, self-made pairs; evaluation: metrics and intervals; trainer: the
recipes; plan: memory plans from the recipes' own step code; report: a run's pages; query: DuckDB views over every
artefact above (pairs, the cache, metrics, eval records, samples, rounds) and SQL run read-only; cli: configs
from YAML, flags and TRL's names, and the commands generated from them (it knows every stage's config)."""


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
            if called in DYNAMIC_IMPORTS and not (node.args and _fixed_or_library(node.args[0])):
                found.append((node.lineno, f"imports by a computed name via {called} (line {node.lineno})"))
    return [what for _, what in sorted(found)]


def _fixed_or_library(arg: ast.expr) -> bool:
    """A name written out, or one computed under a fixed ``pipeline.`` prefix (a library package loading its own
    submodules on first use): neither can reach a stage."""
    if isinstance(arg, ast.Constant):
        return True
    return (isinstance(arg, ast.JoinedStr) and bool(arg.values) and isinstance(arg.values[0], ast.Constant)
            and str(arg.values[0].value).startswith("pipeline."))


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


def _all_imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules ``path`` imports, at the top or inside a function: each name resolved to the longest
    known module (``from pipeline.core import atomic`` is pipeline.core.atomic)."""
    found = set()
    for name in _imports(path):
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _modules(root: Path) -> dict[str, Path]:
    paths = sorted((root / "pipeline").rglob("*.py")) + sorted((root / "stages").glob("*.py"))
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}


def layer_violations(root: Path = ROOT) -> list[str]:
    """A top-level module in pipeline/ (everything lives in a sub-package), a sub-package not in LAYERS, and an
    import of a later layer."""
    bad = [f"{p.relative_to(root)} is a top-level module (put it in the sub-package of its role)"
           for p in sorted((root / "pipeline").glob("*.py")) if p.name != "__init__.py"]
    bad += [f"pipeline/{p.name}/ is not in LAYERS" for p in sorted((root / "pipeline").iterdir())
            if p.is_dir() and (p / "__init__.py").exists() and p.name not in LAYERS]
    modules = _modules(root)
    for name, path in modules.items():
        parts = name.split(".")
        if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in LAYERS:
            continue
        for dep in sorted(_all_imports(path, set(modules))):
            dep_parts = dep.split(".")
            if len(dep_parts) > 1 and dep_parts[0] == "pipeline" and dep_parts[1] in LAYERS \
                    and LAYERS.index(dep_parts[1]) > LAYERS.index(parts[1]):
                bad.append(f"{path.relative_to(root)} ({parts[1]}) imports {dep} ({dep_parts[1]}, a later layer)")
    return bad


def import_circles(root: Path = ROOT) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly connected
    components). A package's ``__init__`` reached on the way to its own submodule is not an edge."""
    modules = _modules(root)
    graph = {m: {d for d in _all_imports(p, set(modules)) if d != m and not m.startswith(d + ".")}
             for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def test_library_never_imports_a_command_module():
    assert library_violations() == []


def test_stages_never_import_each_other():
    assert stage_violations() == []


def test_the_library_is_sub_packages_each_importing_only_earlier_layers():
    assert layer_violations() == []


def test_no_import_circles():
    assert import_circles() == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_layer_check_catches_a_later_layer_a_stray_module_and_an_unknown_package(tmp_path):
    _write(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/core/__init__.py": "", "pipeline/trainer/__init__.py": "",
        "pipeline/core/atomic.py": "def f():\n    from pipeline.trainer.loop import step\n",  # lazy: still counted
        "pipeline/trainer/loop.py": "from pipeline.core.atomic import f\nstep = f\n",  # an earlier layer: fine
        "pipeline/helpers.py": "",
        "pipeline/misc/__init__.py": ""})
    assert layer_violations(tmp_path) == [
        "pipeline/helpers.py is a top-level module (put it in the sub-package of its role)",
        "pipeline/misc/ is not in LAYERS",
        "pipeline/core/atomic.py (core) imports pipeline.trainer.loop (trainer, a later layer)"]


def test_the_circle_check_catches_a_circle_through_a_lazy_import(tmp_path):
    _write(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/core/__init__.py": "", "stages/__init__.py": "",
        "pipeline/core/a.py": "from pipeline.core import b\n",
        "pipeline/core/b.py": "def f():\n    import pipeline.core.c\n",
        "pipeline/core/c.py": "from pipeline.core.a import x\n",
        "stages/run_all.py": "from stages.run_rounds import rounds\n",
        "stages/run_rounds.py": "def rounds():\n    from stages.run_all import helper\n"})
    assert import_circles(tmp_path) == [["pipeline.core.a", "pipeline.core.b", "pipeline.core.c"],
                                        ["stages.run_all", "stages.run_rounds"]]


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
        'DOC = "as stages.train runs it"\n'  # prose about a stage is not an import
        'RECORD = {"stages": {}}\n'  # a key named stages: fine
        'def own(sub):\n    return importlib.import_module(f"pipeline.models.{sub}")\n')  # the library's own: fine
    assert library_violations(tmp_path) == [
        "pipeline/index.py names 'stages.train:command' (line 2)",
        "pipeline/index.py imports by a computed name via import_module (line 4)",
        "pipeline/index.py names 'stages.train' (line 6)"]


def test_importing_the_library_changes_no_environment():
    # torch sets TORCHINDUCTOR_CACHE_DIR when transformers' model classes import dynamo: not ours to judge,
    # so the baseline is taken after the third-party imports.
    code = ("import os, torch, transformers; from transformers import PreTrainedModel; before = dict(os.environ)\n"
            "import pipeline, pipeline.core.config, pipeline.models, pipeline.cli.commands, stages.cli\n"
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TQDM_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "[]"
