"""No import cycles between tuneforge's modules, counting the imports inside functions too.

The graph is read from the source (an AST walk over src/tuneforge, nothing is imported), with one
edge from a module M for each module whose body must have run for M's import statement to succeed:

- `import a.b.c` and `from a.b import c` where a/b/c is a module: an edge to a.b.c;
- `from a.b import name` where `name` is not a submodule: an edge to the package a.b (its body
  defines the name);
- relative imports (`from . import x`, `from ..fast import y`) are resolved against M's package first;
- Python runs every package above a target before the target: an edge to each of those packages,
  except M's own ancestors, whose import has already begun when M runs. So a submodule may import
  its sibling through the parent (`from tuneforge.fast.kernels import gated_triton`) freely, and a
  name from its parent package (`from tuneforge.fast import default_chunk`) only as long as the
  parent does not import that submodule back: that would be a real cycle, and it is reported.

A cycle's modules are grouped as they reach each other (a strongly connected component); each group
is printed as one path through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "tuneforge"

def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tuneforge modules whose bodies the import statements of `name` (anywhere in it) need."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: from M's package, one package up per extra dot
                source = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], source]))
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    started = {*_ancestors(name), name}  # packages whose import has begun before this module's body runs
    needed = set()
    for target in targets:
        needed.add(target)
        needed.update(a for a in _ancestors(target) if a not in started)
    return needed & modules.keys()


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the tuneforge modules it imports, as the module docstring defines the edges."""
    modules = module_files(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module an import of `start` runs, at any depth (itself only if on a cycle)."""
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()] - seen:
            seen.add(child)
            todo.append(child)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The modules on import cycles, grouped: each group is a set of modules that all reach each other."""
    reach = {m: reachable(graph, m) for m in graph}
    groups = {frozenset(n for n in reach[m] if m in reach[n]) for m in graph if m in reach[m]}
    return sorted(groups, key=min)


def cycle_path(graph: dict[str, set[str]], group: frozenset[str], start: str | None = None) -> list[str]:
    """One shortest cycle through `start` (default: the group's first module), as a path that ends
    where it starts."""
    start = start or min(group)
    paths, queue = {start: [start]}, [start]
    for node in queue:  # breadth first, so the first way back is a shortest one
        for child in sorted(graph[node] & group):
            if child == start:
                return paths[node] + [start]
            if child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    return [start]


def test_no_import_cycles():
    graph = import_graph()
    found = [f"{' -> '.join(cycle_path(graph, c))}  [{len(c)} modules]" for c in cycles(graph)]
    assert not found, "import cycles (move the shared piece down into a module both import):\n" + "\n".join(found)


def test_training_never_imports_the_server():
    """The server sits on top: training, evaluation and models reach none of its modules."""
    graph = import_graph()
    for name in graph:
        if name.startswith(("tuneforge.train", "tuneforge.methods", "tuneforge.eval", "tuneforge.models")):
            seen, todo = set(), [name]
            while todo:
                for nxt in graph[todo.pop()] - seen:
                    seen.add(nxt)
                    todo.append(nxt)
            served = sorted(m for m in seen if m.startswith("tuneforge.serve"))
            assert not served, f"{name} imports the server ({served})"


def test_the_graph_sees_imports_inside_functions_and_relative_imports(tmp_path):
    """The walk must see what a cycle hides behind: a local import, `from . import x`, a parent's name."""
    root = tmp_path / "tuneforge"
    (root / "fast").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "fast" / "__init__.py").write_text("from .inner import helper\n")
    (root / "fast" / "inner.py").write_text("def helper():\n    from tuneforge.plan import cost\n")
    (root / "fast" / "kernels.py").write_text("from tuneforge.fast import inner\n")  # a sibling: no edge to fast
    (root / "plan.py").write_text("from . import fast\ncost = 1\n")
    graph = import_graph(root)
    assert graph["tuneforge.fast.inner"] == {"tuneforge.plan"}
    assert graph["tuneforge.fast.kernels"] == {"tuneforge.fast.inner"}
    assert cycles(graph) == [frozenset({"tuneforge.fast", "tuneforge.fast.inner", "tuneforge.plan"})]
    assert cycle_path(graph, cycles(graph)[0]) == ["tuneforge.fast", "tuneforge.fast.inner", "tuneforge.plan",
                                                   "tuneforge.fast"]
