"""The package's layering: import-linter's contracts (pyproject.toml) hold and can fail, and
no lfm_ray module takes part in an import circle, counting imports inside functions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lfm_ray"


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the project folder `project` (its pyproject.toml and lfm_ray/)."""
    pytest.importorskip("importlinter")
    code = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=project,
                          env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(PACKAGE, project / "lfm_ray",
                    ignore=shutil.ignore_patterns("__pycache__", "fashion_pool", "classnames"))
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    return project


def test_the_layer_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # The worker's loop taking something from the driver, at function level as the old
    # train.py did: the worker contract and the layers break.
    ("worker/loop.py", "def _sneak():\n    from lfm_ray.driver.launch import launch_dir\n",
     "The worker never imports the driver"),
    # A lower layer taking a helper from the loop.
    ("similarity.py", "from lfm_ray.worker.loop import seeded_generator\n",
     "What the loop uses never imports the loop"),
    # The contract importing torch.
    ("contract.py", "import torch\n", "The run's contract and the config import neither"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, broken):
    project = copy_project(tmp_path)
    target = project / "lfm_ray" / module
    target.write_text(target.read_text() + "\n\n" + line)
    result = lint_imports(project)
    assert result.returncode != 0, result.stdout
    out = " ".join(result.stdout.split())  # import-linter wraps long names
    assert f"{broken}" in out and "BROKEN" in out, result.stdout


# ---- no circles -------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path, modules: set[str]) -> set[str]:
    """The lfm_ray modules `path` imports anywhere in it (module level, in functions, under
    TYPE_CHECKING): `from lfm_ray.a import b` counts as lfm_ray.a.b where that is a module,
    else as lfm_ray.a."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("lfm_ray") and target != name:
                found.add(target)
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def package_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): own_imports(p, modules) for p in files}


def test_the_circle_check_finds_a_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count():
    graph = package_graph()
    # loop.py imports the backbones inside Run.__init__.
    assert "lfm_ray.backbones" in graph["lfm_ray.worker.loop"]
    assert "lfm_ray.worker.loop" in graph["lfm_ray.driver.launch"]


def test_no_import_circle_among_the_package_modules():
    assert import_circles(package_graph()) == []
