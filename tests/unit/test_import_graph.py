"""The import graph of ``sface_dist``: no cycle, the layers of docs/design.md (The layout), and the data package
never importing the evaluation package.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a lazy import
still ties the modules together), relative ones resolved. An edge goes to the module a statement
names (``from pkg import mod`` to ``pkg.mod`` when that is a module); the implicit import of the
packages above it (their ``__init__``) is left out, so a package that re-exports its own modules is
not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> source file of every module of ``root/package`` (a package is its ``__init__``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _enclosing_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module of ``modules``, else the nearest enclosing one (None outside them)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (source ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = {_enclosing_module(target, modules) for target in targets}
    return {module for module in found if module is not None and module != name}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports."""
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first, sorted order)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor in on_path:
                return path[path.index(successor) :] + [successor]
            if successor not in done:
                cycle = visit(successor)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_find_cycle_reports_a_planted_cycle_and_passes_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_graph_sees_relative_and_function_level_imports(tmp_path: Path) -> None:
    """A cycle through a relative import, a lazy import inside a function and a ``from pkg import module``."""
    files = {
        "pkg/__init__.py": "from pkg.a import thing\n",
        "pkg/a.py": "from . import b\nthing = 1\n",
        "pkg/b.py": "import os\n\ndef later():\n    from pkg.sub.c import other\n    return other\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import thing as other\n",
        "pkg/d.py": "import pkg.sub.c\nfrom pkg import a, missing_name\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a"},
        "pkg.d": {"pkg", "pkg.a", "pkg.sub.c"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_sface_dist_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(ROOT, "sface_dist"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_data_package_does_not_import_evaluation() -> None:
    graph = import_graph(ROOT, "sface_dist")
    assert set(graph) > {"sface_dist.data.loader", "sface_dist.evaluation.embedder"}  # the walk found them
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("sface_dist.data.")
        for target in targets
        if target.startswith("sface_dist.evaluation")
    )
    assert not wrong, "the data package imports evaluation: " + ", ".join(wrong)


LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"config", "config_reference", "console", "atomic_write", "file_digest", "memory", "progress_bar",
                    "process_pool", "stop_signals"}),
    ("ranks", {"parallel"}),
    ("formats and components", {"checkpoint", "cli", "data", "backbones", "heads"}),
    ("uses of them", {"evaluation", "export"}),
    ("the loop", {"training", "train"}),
]
"""The package's layers, bottom up (docs/design.md, The layout), by the top-level module or package under
``sface_dist``. A module imports only from its own layer or those below; the components of the middle layer are
independent of each other."""
INDEPENDENT = "formats and components"


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, top-level name) of a ``sface_dist`` module."""
    top = module.split(".")[1] if "." in module else module
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index, top
    raise AssertionError(f"{module} is in no layer: add {top} to LAYERS and to docs/design.md's layout")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against ``LAYERS``, as ``module -> target (why)``."""
    wrong = []
    for module, targets in graph.items():
        if module == "sface_dist":
            continue
        (level, top) = layer_of(module)
        for target in targets:
            (target_level, target_top) = layer_of(target)
            if target_level > level:
                wrong.append(f"{module} -> {target} (from {LAYERS[level][0]} up to {LAYERS[target_level][0]})")
            elif target_level == level and LAYERS[level][0] == INDEPENDENT and target_top != top:
                wrong.append(f"{module} -> {target} (two independent components)")
    return sorted(wrong)


def test_layering_rules_catch_an_upward_and_a_sideways_import() -> None:
    graph = {"sface_dist.data.loader": {"sface_dist.training.trainer", "sface_dist.heads.sface", "sface_dist.config"},
             "sface_dist.training.trainer": {"sface_dist.data.loader"}}
    assert layering_violations(graph) == [
        "sface_dist.data.loader -> sface_dist.heads.sface (two independent components)",
        "sface_dist.data.loader -> sface_dist.training.trainer (from formats and components up to the loop)",
    ]


def test_sface_dist_keeps_its_layers() -> None:
    graph = import_graph(ROOT, "sface_dist")
    wrong = layering_violations(graph)
    assert not wrong, "imports against the layers of docs/design.md:\n" + "\n".join(wrong)
