"""dbgen's modules import each other without a cycle.

The graph is built statically with :mod:`ast` from every ``import`` / ``from ... import`` statement of every
module under ``dbgen/``, at the top level and inside functions alike (a function-level import still ties the
two modules together; only a cycle-free graph lets each module be read, tested and replaced on its own).
Relative imports are resolved; ``from package import name`` counts as importing the submodule ``package.name``
when such a module exists, else the package itself; a package's ``__init__`` is a module of its own.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``*.py`` under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of ``modules`` (``import a.b.c``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (top level or in a function)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_deepest(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package[: len(package) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _deepest(base, modules))
            graph[name].update(t for t in targets if t is not None and t != name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component: a shortest one through its first module."""
    return [_cycle_in(graph, set(c)) for c in strongly_connected(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component (BFS)."""
    start = min(component)
    parent = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in the strongly connected component {sorted(component)}")


def test_dbgen_has_no_import_cycle():
    graph = import_graph(ROOT / "dbgen")
    assert len(graph) > 30 and "dbgen.trainer" in graph and "dbgen.data" in graph  # the walk saw the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among dbgen's modules:\n" + "\n".join(
        f"{' -> '.join(c)}   (modules tied together: {', '.join(m)})"
        for c, m in zip(cycles, strongly_connected(graph), strict=True)
    )


# ------------------------------------------------------------------------------- the checker checks itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_graph_resolves_every_import_form(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n",
            "pkg/a.py": "import os\nimport pkg.sub.c\n\ndef f():\n    from . import b  # a submodule\n",
            "pkg/b.py": "from pkg import VERSION  # not a submodule: the package itself\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from .. import a\nfrom ..b import g\nfrom . import d\n",
            "pkg/sub/d.py": "def h():\n    import json  # not the package's\n",
        },
    )
    graph = import_graph(pkg)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.c", "pkg.b"},
        "pkg.b": {"pkg"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.b", "pkg.sub.d"},
        "pkg.sub.d": set(),
    }
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1]
    assert set(cycles[0]) == {"pkg", "pkg.a", "pkg.b"}  # pkg -> pkg.a -> pkg.b -> pkg (pkg.sub.c is not on it)


def test_function_level_imports_close_cycles(tmp_path):
    """The two cycles this test was written against: a driver/CLI cycle closed only by imports inside
    functions, and a data package whose split reader built the built-in data set (which writes splits)."""
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/evaluate.py": "RUN = 1\n\ndef main():\n    from .export import load\n    from .train import connect\n",
            "pkg/export.py": "def run():\n    from .evaluate import RUN\n",
            "pkg/sample.py": "from .evaluate import RUN\n",
            "pkg/trainer.py": "from .evaluate import RUN\nfrom .sample import grid\n",
            "pkg/train.py": "def prepare():\n    from .trainer import check\n",
            "pkg/data/__init__.py": "from .builtin import builtin\nfrom .split import open_split\n",
            "pkg/data/split.py": "def resolve(spec):\n    from .builtin import builtin\n",
            "pkg/data/converters.py": "from .split import MANIFEST\n",
            "pkg/data/builtin.py": "from .converters import write_split\nfrom .split import open_split\n",
        },
    )
    graph = import_graph(pkg)
    assert strongly_connected(graph) == [
        ["pkg.data.builtin", "pkg.data.converters", "pkg.data.split"],
        ["pkg.evaluate", "pkg.export", "pkg.sample", "pkg.train", "pkg.trainer"],
    ]
    cycles = sorted(find_cycles(graph))
    assert [set(c) for c in cycles] == [
        {"pkg.data.builtin", "pkg.data.split"},  # the shortest cycle through the component's first module
        {"pkg.evaluate", "pkg.export"},
    ]
    # every edge of a reported cycle is an import
    for c in cycles:
        assert all(b in graph[a] for a, b in zip(c, c[1:], strict=False))


def test_cycle_free_graph_passes():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
