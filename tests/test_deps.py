"""The import graph of the tree, checked: what decides a stage's bytes is a dep
of that stage in dvc.yaml, what only runs, reports, locks or injects faults
(mirage/run/) is a dep of none, and imports go downward only.

Layers, top to bottom: mirage/cli.py (the one entry point into stage code) >
flows/ (Prefect flows, one per stage, and the pipeline flow) > mirage/run/
(runtime: scheduler, stage command line, server, locks, faults, runner,
report) and tasks/ (what each stage computes) > mirage/models/ > mirage/data/.
"""
from __future__ import annotations

import ast
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mirage", "tasks", "flows")
RUNTIME = "mirage/run/"  # declared once: code that observes or guards a run, never a stage's dep
# files a module reads at run time, beside its imports
READS = {"mirage/models/encoders.py": ["mirage/models/model_configs"]}
# who may import whom (by path prefix): a module of a layer imports only the layers listed for it
ALLOWED = {
    "mirage/data/": ("mirage/__init__.py", "mirage/data/"),
    "mirage/models/": ("mirage/__init__.py", "mirage/data/", "mirage/models/"),
    "tasks/": ("mirage/__init__.py", "mirage/data/", "mirage/models/", "tasks/"),
    "mirage/run/": ("mirage/__init__.py", "mirage/data/", "mirage/models/", "mirage/run/"),
    "flows/": ("mirage/__init__.py", "mirage/data/", "mirage/models/", "mirage/run/", "tasks/", "flows/"),
    "mirage/cli.py": ("mirage/",  "flows/", "tasks/"),
    "mirage/search.py": ("mirage/__init__.py", "mirage/data/", "mirage/models/"),
    "mirage/random_models.py": ("mirage/__init__.py", "mirage/data/", "mirage/models/"),
    "mirage/__init__.py": (),
}


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


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def imported_files(path: Path) -> set[Path]:
    """Project files importing `path`'s imports runs (each package's __init__ too)."""
    out = set()
    for name in imported(path):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b runs a/__init__.py too
            found = module_file(".".join(parts[:i]))
            if found is not None and found != path:
                out.add(found)
    return out


def closure(module: str) -> set[str]:
    """Project files (relative paths) a stage's computation runs: the module,
    what it imports, transitively, the packages' non-empty __init__ files and
    what they read; the walk stops at runtime modules (not followed, not listed)."""
    todo, seen = [module_file(module)], set()
    while todo:
        path = todo.pop()
        if path in seen or rel(path).startswith(RUNTIME):
            continue
        seen.add(path)
        todo += sorted(imported_files(path))
    files = {rel(p) for p in seen if p.stat().st_size > 0}
    return files | {r for f in files for r in READS.get(f, [])}


def stage_modules() -> dict[str, tuple[str, set[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        assert argv[:2] == ["python", "-m"], f"stage {name}: command is not `python -m flows.<stage>`"
        out[name] = (argv[2], {d for d in stage.get("deps", [])})
    return out


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def layer(path: str) -> str:
    return max((k for k in ALLOWED if path.startswith(k)), key=len)


def test_every_imported_project_file_is_a_dep_of_its_stage():
    missing = {name: sorted(closure(module) - deps) for name, (module, deps) in stage_modules().items()}
    missing = {name: files for name, files in missing.items() if files}
    assert not missing, "dvc.yaml misses code deps: " + "; ".join(f"stage {s}: {', '.join(f)}" for s, f in missing.items())


def test_no_stage_lists_code_it_does_not_run():
    """A listed project module the stage never imports would rerun it for nothing."""
    extra = {}
    for name, (module, deps) in stage_modules().items():
        code = {d for d in deps if d.endswith(".py") or d.startswith("mirage/models/model_configs")}
        if code - closure(module):
            extra[name] = sorted(code - closure(module))
    assert not extra, f"dvc.yaml lists code a stage does not import: {extra}"


def test_runtime_code_is_no_stage_dep_and_no_computation_imports_it():
    """Editing how runs are reported, locked or served reruns nothing; and
    nothing a stage computes with reaches mirage/run/ (only flows/ do)."""
    listed = {name: sorted(d for d in deps if d.startswith(RUNTIME)) for name, (_, deps) in stage_modules().items()}
    assert not any(listed.values()), f"runtime modules listed as stage deps: {listed}"
    reaching = [f"{rel(p)} -> {rel(q)}" for p in project_files() if layer(rel(p)) in ("tasks/", "mirage/data/", "mirage/models/")
                for q in imported_files(p) if rel(q).startswith(RUNTIME)]
    assert not reaching, f"stage computation imports runtime code: {reaching}"
    runtime = [p for p in project_files() if rel(p).startswith(RUNTIME)]
    assert len(runtime) >= 8  # the walk sees the package (scheduler, stage, server, locks, faults, runner, ...)


def test_imports_go_downward_only_and_make_no_circle():
    upward = [f"{rel(p)} -> {rel(q)}" for p in project_files() for q in imported_files(p)
              if not rel(q).startswith(ALLOWED[layer(rel(p))])]
    assert not upward, f"imports against the layering: {upward}"
    graph = {rel(p): {rel(q) for q in imported_files(p)} for p in project_files()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(nxt_ := node, set())):
            if state.get(nxt) == 1:
                return path + [nxt_, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node, [])):
            raise AssertionError(f"import circle: {' -> '.join(circle)}")


def test_the_checks_catch_what_they_guard(tmp_path, monkeypatch):
    """Each check fails on the tree it is there to refuse: the walk sees lazy
    and transitive imports, a dep list missing a module, an upward import, a circle."""
    files = closure("flows.discover")
    assert "mirage/data/store.py" in files  # imported by the flow
    assert "mirage/data/schema.py" in files  # `from mirage.data import schema`
    assert "mirage/models/model_configs" in files  # read by mirage/models/encoders.py at import
    assert "flows/evaluate.py" not in files and not any(f.startswith(RUNTIME) for f in files)
    # a copy of the tree with an upward import and a circle planted in it
    fake = tmp_path / "tree"
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            target = fake / p.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(p.read_text())
    clean_images = (fake / "mirage/data/images.py").read_text()
    (fake / "mirage/data/images.py").write_text(clean_images + "\nfrom tasks import discover\n")
    (fake / "mirage/data/schema.py").write_text((fake / "mirage/data/schema.py").read_text() + "\nimport mirage.data.store\n")
    (fake / "mirage/data/store.py").write_text((fake / "mirage/data/store.py").read_text() + "\nimport mirage.data.schema\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    try:
        test_imports_go_downward_only_and_make_no_circle()
    except AssertionError as err:
        assert "mirage/data/images.py -> tasks/discover.py" in str(err)
    else:
        raise AssertionError("an upward import passed")
    (fake / "mirage/data/images.py").write_text(clean_images)
    try:
        test_imports_go_downward_only_and_make_no_circle()
    except AssertionError as err:
        assert "circle" in str(err) and "mirage/data/store.py" in str(err)
    else:
        raise AssertionError("an import circle passed")
