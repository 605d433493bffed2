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

A cycle is a strongly connected component of more than one module (or a module importing itself);
each is printed as one path through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "tuneforge"

# Cycles other slices are removing in parallel, each as the modules it runs through; a cycle found must
# lie within one of these. The integrator empties this list once those slices are merged.
KNOWN_CYCLES: list[frozenset[str]] = [
    # serve-decode: eval, serve and GRPO sampling decode through each other (one decoding module in models/)
    frozenset({"tuneforge.eval.evaluate", "tuneforge.methods", "tuneforge.methods.grpo", "tuneforge.methods.sampling",
               "tuneforge.serve", "tuneforge.serve.engine", "tuneforge.serve.server"}),
    # checkpoints: one checkpoint package for single-process and sharded state
    frozenset({"tuneforge.train.checkpoint", "tuneforge.parallel.checkpoint"}),
]


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
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
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


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with a cycle in them (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(frozenset(component))
    return found


def cycle_path(graph: dict[str, set[str]], component: frozenset[str], start: str | None = None) -> list[str]:
    """One shortest cycle through `start` (default: the component's first module), as a path that ends
    where it starts."""
    start = start or min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    return [start]


def test_no_new_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    known = frozenset().union(*KNOWN_CYCLES)
    paths = [" -> ".join(cycle_path(graph, c, min(c - known, default=None))) for c in found]  # through what is new
    print("\n".join(paths))
    new = [f"{path}  [{len(c)} modules: {', '.join(sorted(c))}]" for c, path in zip(found, paths)
           if not any(c <= k for k in KNOWN_CYCLES)]
    assert not new, "import cycles (move the shared piece down into a module both import):\n" + "\n".join(new)


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
