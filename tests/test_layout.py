"""Data flows one way through the package: a module imports only modules before it.

Imports are read from the source with ``ast``, including imports inside functions (a lazy import
is still a dependency). Modules not written yet are skipped in the check, not in the test.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import tomllib

PACKAGE = Path(__file__).parent.parent / "nbindustria"

ORDER = ["errors", "config", "task", "graph", "hashing", "keys", "store", "events", "panels",
         "dashboard", "worker", "explain", "scheduler", "reporting", "cluster", "engineloop",
         "dispatch", "pipeline", "cellcache", "magics", "cli"]


def package_imports(path: Path) -> list[tuple[str, int]]:
    """(module of this package, line) for every import in the file, at any depth."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.append((node.module.split(".")[0], node.lineno))
                else:  # from . import x, y
                    found += [(alias.name, node.lineno) for alias in node.names]
            elif node.level == 0 and node.module and (
                    node.module == "nbindustria" or node.module.startswith("nbindustria.")):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.append((parts[1], node.lineno))
                else:
                    found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nbindustria" and len(parts) > 1:
                    found.append((parts[1], node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("nbindustria."):
                found.append((name.split(".")[1], node.lineno))
            elif name.startswith(".") and len(name) > 1:
                found.append((name[1:].split(".")[0], node.lineno))
    return found


def test_every_module_has_a_place_in_the_flow() -> None:
    present = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    # A module outside the list must be placed in it (and in the docs) deliberately.
    unplaced = sorted(present - set(ORDER))
    known_helpers = {"cellcache"}  # placed below
    assert not set(unplaced) - known_helpers, unplaced


def test_imports_flow_one_way() -> None:
    order = list(ORDER)
    # cellcache: the %%cache machinery, used by magics only.
    order.insert(order.index("magics"), "cellcache")
    rank = {name: i for i, name in enumerate(order)}
    violations = []
    checked = 0
    for name in order:
        path = PACKAGE / f"{name}.py"
        if not path.exists():
            continue
        checked += 1
        for imported, line in package_imports(path):
            if imported not in rank:
                if (PACKAGE / f"{imported}.py").exists():
                    violations.append(f"{name}.py:{line} imports {imported}, which has no place")
                continue
            if rank[imported] >= rank[name]:
                violations.append(f"{name}.py:{line} imports {imported} (later in the flow)")
    assert checked >= 12
    assert violations == []


def test_the_package_root_only_reexports() -> None:
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert all(alias.name != "*" for alias in node.names), "no star imports"


def test_parser_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from .errors import X\n"
        "from . import task, graph\n"
        "import nbindustria.store\n"
        "from nbindustria import keys\n"
        "def f():\n"
        "    from .pipeline import Pipeline\n"
        "    import importlib\n"
        "    importlib.import_module('nbindustria.magics')\n")
    assert sorted(name for name, _ in package_imports(source)) == [
        "errors", "graph", "keys", "magics", "pipeline", "store", "task"]


def test_binder_installs_what_the_tutorials_import() -> None:
    """binder/ (DESIGN.md §6) builds an image where every tutorial's imports resolve: from
    requirements.txt, from this checkout (postBuild), or from nbindustria's own dependencies."""
    root = PACKAGE.parent
    binder = root / "binder"
    post_build = binder / "postBuild"
    assert os.access(post_build, os.X_OK), "repo2docker runs postBuild only if it is executable"
    assert re.search(r'pip install [^\n]*"\.\[dashboard', post_build.read_text()), \
        "postBuild must install this checkout with the dashboard extra"
    assert "openmpi-bin" in (binder / "apt.txt").read_text().split()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = [line for line in (binder / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    specs = (project["dependencies"] + project["optional-dependencies"]["dashboard"]
             + project["optional-dependencies"]["mpi"] + requirements)
    installed = {re.split(r"[<>=\[ ;]", spec, maxsplit=1)[0].lower() for spec in specs}
    installed |= {"nbindustria", "ipython"}
    module_to_dist = {"IPython": "ipython", "mpi4py": "mpi4py", "sklearn": "scikit-learn"}
    tutorials = sorted((root / "notebooks").glob("*.ipynb"))
    assert tutorials
    for notebook in tutorials:
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            for module in re.findall(r"^\s*(?:import|from)\s+(\w+)", "".join(cell["source"]),
                                     re.M):
                dist = module_to_dist.get(module, module).lower()
                if dist in sys.stdlib_module_names:
                    continue
                assert dist in installed, f"{notebook.name} imports {module}: add it to binder/"
