"""The package's import graph: one-way layers, no cycles between bimedix modules, no private names imported
across modules, and no imports of the old module paths kept for one release."""

from __future__ import annotations

import ast
from pathlib import Path

import bimedix

PACKAGE_DIR = Path(bimedix.__file__).parent
REPO_DIR = PACKAGE_DIR.parent

#: The bimedix packages (and top-level modules) each one may import besides itself: data flows one way, from
#: original files to records, dataset, trainer, adapter, eval, card and chat (docs: STYLE.md). ``core`` and
#: the top-level helpers in `BASE` are the base layer; nothing imports ``cli``.
BASE = {"core", "resources", "deprecations", "hub_kernels"}
LAYERS = {
    **{base: set() for base in BASE},
    "data": BASE,
    "llm": BASE | {"data"},
    "training": BASE | {"data"},
    "hub": BASE | {"data"},
    "eval": BASE | {"data", "llm"},
    "web": BASE | {"data", "llm"},
    "chat": BASE | {"data", "training", "web"},
    "cli": BASE | {"data", "llm", "training", "hub", "eval", "web", "chat"},
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, str | None]]:
    """(imported bimedix module, imported name or None) for every import statement, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "bimedix"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "bimedix":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, None) if submodule in modules else (target, alias.name))
    return found


def _layer(module: str) -> str:
    """The `LAYERS` key of a bimedix module: its package below ``bimedix``, or the top-level module's name."""
    return module.split(".")[1]


def _deprecated_modules() -> set[str]:
    """The old module paths kept for one release: modules whose ``__getattr__`` is made by
    `bimedix.core.moved.moved`."""
    found = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
            if (targets == ["__getattr__"] and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "moved"):
                found.add(_module_name(path))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    paths = [p for p in PACKAGE_DIR.rglob("*.py") if "bundled" not in p.parts]
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for path in paths:
        source = _module_name(path)
        for target, name in _imports(path, modules):
            # importing a package's name goes through its __init__; a module's own package is not a dependency
            if target in modules and target != source and not source.startswith(target + "."):
                graph[source].add(target)
            if name and name.startswith("_") and not name.startswith("__") and target != source:
                private.append(f"{source} imports {target}.{name}")
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph, _ = _graph()
    assert "bimedix.core.io" in graph and graph["bimedix.cli.data"], "the import graph was not read"
    assert _cycles(graph) == []


def test_no_private_names_imported_across_modules():
    _, private = _graph()
    assert private == []


def test_layers_are_one_way():
    graph, _ = _graph()
    modules = [m for m in graph if m != "bimedix"]
    unknown = sorted({_layer(m) for m in modules} - set(LAYERS))
    assert unknown == [], f"add {unknown} to LAYERS with the packages they may import"
    wrong = sorted(f"{source} imports {target}" for source in modules for target in graph[source]
                   if target != "bimedix" and _layer(target) != _layer(source)
                   and _layer(target) not in LAYERS[_layer(source)])
    assert wrong == []


def test_nothing_imports_the_deprecated_module_paths():
    deprecated = _deprecated_modules()
    assert "bimedix.data.io" in deprecated, "the deprecated modules were not found"
    graph, _ = _graph()
    modules = set(graph)
    scripts = [p for folder in ("tests", "benchmarks", "scripts", "recipes")
               for p in (REPO_DIR / folder).rglob("*.py")]
    users = {_module_name(p): p for p in [*PACKAGE_DIR.rglob("*.py"), *scripts] if "bundled" not in p.parts}
    wrong = sorted(f"{name} imports {target}" for name, path in users.items() if name not in deprecated
                   for target, _ in _imports(path, modules) if target in deprecated)
    assert wrong == [], "import from the new module paths (bimedix.core, bimedix.data.schema)"
