"""The layers, checked by path: ray_mtt/core never imports ray, mlflow, optuna or the layers above
it, nor starts them as a subprocess (`[sys.executable, "-m", "ray_mtt.bench"]`); the benchmark
harness (measure) sees only core; scale never imports cli; and no module imports itself back
through others. Imports are read from the source (AST) at any depth, inside functions too, so a
lazy import cannot hide."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ray_mtt"
ORCHESTRATION = {"ray", "mlflow", "optuna"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: {i for i in imports_of(p, root) if i in modules and i != m} for m, p in modules.items()}


SHELL_COMMAND = re.compile(r"^\S*python\S*\s+-m\s+(ray_mtt[\w.]*)")  # "python -m ray_mtt.x ..." run as a command


def started_modules(path: Path) -> set[str]:
    """Modules `path` starts as programs: ["-m", "ray_mtt.x"] in an argument list, or a command string."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            found.update(m for flag, m in zip(items, items[1:]) if flag == "-m" and isinstance(m, str))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SHELL_COMMAND.match(node.value):
            found.add(SHELL_COMMAND.match(node.value).group(1))
    return {m for m in found if m.startswith("ray_mtt")}


def violations(root: Path) -> list[str]:
    """Imports (and started programs) that break the layering rule, as 'module imports name' lines."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        for imported in sorted(imports_of(path, root)):
            top = imported.split(".")[0]
            if name.startswith("ray_mtt.core") and (top in ORCHESTRATION or is_above(imported, "ray_mtt.core")):
                bad.append(f"{name} imports {imported}")
            if name.startswith("ray_mtt.measure") and (top in ORCHESTRATION or is_above(imported, "ray_mtt.core",
                                                                                         "ray_mtt.measure")):
                bad.append(f"{name} imports {imported}")
            if name.startswith("ray_mtt.scale") and imported.startswith("ray_mtt.cli"):
                bad.append(f"{name} imports {imported}")
        if name.startswith("ray_mtt.core"):
            bad += [f"{name} starts {m}" for m in sorted(started_modules(path)) if is_above(m, "ray_mtt.core")]
    return bad


def is_above(module: str, *allowed: str) -> bool:
    """A ray_mtt module outside the `allowed` packages."""
    return module.split(".")[0] == "ray_mtt" and not module.startswith(allowed)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by depth-first search (each reported once, from its first module)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_core_imports_neither_orchestration_nor_the_layers_above():
    assert violations(PACKAGE) == []


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_checks_catch_a_lazy_import_and_a_cycle(tmp_path):
    root = tmp_path / "ray_mtt"
    (root / "core").mkdir(parents=True)
    (root / "scale").mkdir()
    for folder in (root, root / "core", root / "scale"):
        (folder / "__init__.py").write_text("")
    (root / "core" / "distill.py").write_text("def main():\n    from ..scale import tracking\n")
    (root / "scale" / "tracking.py").write_text("import mlflow\nfrom ..core.distill import main\n")
    (root / "core" / "data.py").write_text("def f():\n    import ray\n")
    (root / "core" / "bench.py").write_text(
        "import subprocess, sys\n"
        "def child():\n    subprocess.run([sys.executable, '-m', 'ray_mtt.bench', '--child'])\n"
        "def shell():\n    subprocess.run('python -m ray_mtt.cli.tune --help', shell=True)\n"
        "def message():\n    return 'run `python -m ray_mtt.experts` first'  # a hint to the user, not a call\n")
    (root / "measure").mkdir()
    (root / "measure" / "problem.py").write_text("from ..core.data import f\nfrom ..scale import tracking\n")
    assert violations(root) == ["ray_mtt.core.bench starts ray_mtt.bench", "ray_mtt.core.bench starts ray_mtt.cli.tune",
                                "ray_mtt.core.data imports ray", "ray_mtt.core.distill imports ray_mtt.scale",
                                "ray_mtt.core.distill imports ray_mtt.scale.tracking",
                                "ray_mtt.measure.problem imports ray_mtt.scale",
                                "ray_mtt.measure.problem imports ray_mtt.scale.tracking"]
    assert cycles(import_graph(root)) == [["ray_mtt.core.distill", "ray_mtt.scale.tracking", "ray_mtt.core.distill"]]


@pytest.mark.parametrize("module", ["ray_mtt.core.distill", "ray_mtt.measure.problem", "ray_mtt.measure.profile",
                                    "ray_mtt.measure.memory", "ray_mtt.cli.bench",
                                    "ray_mtt.cli.evaluate"])
def test_torch_only_modules_load_without_ray_or_mlflow(module):
    """At run time too: what a bare GPU box runs never loads them (checked in a fresh interpreter)."""
    import subprocess
    import sys
    code = (f"import sys, {module}\nbad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(ORCHESTRATION)})\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
