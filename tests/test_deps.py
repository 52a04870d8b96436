"""Every project file a stage's command imports (transitively) or reads is a dep
of that stage in dvc.yaml, so a code change reruns exactly that stage and what
follows it."""
from __future__ import annotations

import ast
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mirage", "tasks", "flows")
# files a module reads at run time, beside its imports
READS = {"mirage/models.py": ["mirage/model_configs"]}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imported(path: Path) -> set[str]:
    """Dotted names a file imports, anywhere in it (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from mirage import schema`
    return names


def closure(module: str) -> set[str]:
    """Project files (relative paths) a module runs: itself, what it imports,
    transitively, the packages' non-empty __init__ files, and what they read."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b runs a/__init__.py too
            path = module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo += sorted(imported(path))
    files = {str(p.relative_to(ROOT)) for p in seen if p.stat().st_size > 0}
    return files | {r for f in files for r in READS.get(f, [])}


def stage_modules() -> dict[str, tuple[str, set[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        assert argv[:2] == ["python", "-m"], f"stage {name}: command is not `python -m flows.<stage>`"
        out[name] = (argv[2], {d for d in stage.get("deps", [])})
    return out


def test_every_imported_project_file_is_a_dep_of_its_stage():
    missing = {name: sorted(closure(module) - deps) for name, (module, deps) in stage_modules().items()}
    missing = {name: files for name, files in missing.items() if files}
    assert not missing, "dvc.yaml misses code deps: " + "; ".join(f"stage {s}: {', '.join(f)}" for s, f in missing.items())


def test_no_stage_lists_code_it_does_not_run():
    """A listed project module the stage never imports would rerun it for nothing."""
    extra = {}
    for name, (module, deps) in stage_modules().items():
        code = {d for d in deps if d.endswith(".py") or d.startswith("mirage/model_configs")}
        if code - closure(module):
            extra[name] = sorted(code - closure(module))
    assert not extra, f"dvc.yaml lists code a stage does not import: {extra}"


def test_the_walk_sees_lazy_and_transitive_imports():
    files = closure("flows.discover")
    assert "mirage/store.py" in files  # imported by the flow
    assert "mirage/schema.py" in files  # `from mirage import schema`
    assert "mirage/model_configs" in files  # read by mirage/models.py at import
    assert "flows/evaluate.py" not in files
