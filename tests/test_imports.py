"""starpo's imports: no cycle among its modules, and no import against the layer order of
the README's "Layout" section, counting imports inside functions too (a lazy import hides
a cycle from Python's import system, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import starpo

ROOT = Path(starpo.__file__).parent
README = ROOT.parent.parent / "README.md"


class Import(NamedTuple):
    importer: str        # dotted module name
    imported: str        # the starpo module it names
    path: Path
    line: int


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_imports(root: Path = ROOT) -> list[Import]:
    """Every import of a module of the package at ``root`` by another one (``from a.b import
    c`` names ``a.b.c`` when that is a module, else ``a.b``; relative imports resolved)."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    out = []
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base
                           for a in node.names]
            out += [Import(name, t, path, node.lineno) for t in dict.fromkeys(targets)
                    if t in paths and t != name]
    return sorted(out, key=lambda imp: (str(imp.path), imp.line))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module → the starpo modules it imports."""
    graph: dict[str, set[str]] = {_module_name(p, root): set() for p in root.rglob("*.py")}
    for imp in find_imports(root):
        graph[imp.importer].add(imp.imported)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}          # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


# --------------------------------------------------------------------------- layers

def declared_layers(readme: str) -> list[list[str]]:
    """The layer order the README declares, top first: the entries of the ``src/starpo/``
    tree in its "Layout" section (lines indented by exactly two spaces, names then two
    spaces and a description; one line may name several modules of one layer, as
    ``errors.py fileio.py``)."""
    block = readme.split("\n## Layout\n", 1)[1].split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            continue
        # the names column ends at the first run of two spaces, where the description starts
        column = line.strip().split("  ", 1)[0].split()
        names = [t.removesuffix("/").removesuffix(".py") for t in column
                 if t.endswith((".py", "/"))]
        if names:
            layers.append(names)
    return layers


def _unit(module: str) -> str | None:
    """The top-level module or package of ``starpo`` a module belongs to (None: the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(layers: list[list[str]], root: Path = ROOT) -> list[str]:
    """One line per import against ``layers`` (top first): a module imports only modules of
    its own layer and of the layers before it."""
    rank = {name: i for i, names in enumerate(layers) for name in names}
    out = []
    for imp in find_imports(root):
        a, b = _unit(imp.importer), _unit(imp.imported)
        if a is None or b is None or a == b or a not in rank or b not in rank:
            continue          # the package root; units missing from the order fail below
        if rank[b] > rank[a]:
            where = imp.path.relative_to(root.parent.parent if root == ROOT else root.parent)
            out.append(f"{where}:{imp.line}: {imp.importer} imports {imp.imported}, but {b} "
                       f"comes after {a} in the README's layer order")
    return out


def test_no_import_cycle_among_starpo_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_every_module_is_in_the_readme_layer_order():
    layers = declared_layers(README.read_text())
    named = [n for names in layers for n in names]
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert len(named) == len(set(named)), f"named twice in the README's layout: {named}"
    assert units <= set(named), ("missing from the README's layout (place each in the layer "
                                 f"order): {sorted(units - set(named))}")
    assert set(named) <= units, f"the README's layout names no such module: " \
                                f"{sorted(set(named) - units)}"


def test_no_import_against_the_readme_layer_order():
    bad = layer_violations(declared_layers(README.read_text()))
    assert not bad, "imports against the layer order of the README's Layout section:\n" + \
        "\n".join(bad)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions():
    g = import_graph()
    assert "starpo.run.pipeline" in g["starpo.cli"]         # cli imports it in a command


def test_the_layer_check_catches_a_bad_import(tmp_path):
    """A synthetic package: `app` may use `base`, listed before it; `base` may not use
    `app`, in any spelling of an import."""
    pkg = tmp_path / "starpo"
    (pkg / "base").mkdir(parents=True)
    (pkg / "app").mkdir()
    for f in ("__init__.py", "base/__init__.py", "base/deep.py", "app/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "app" / "a.py").write_text("from starpo.base import deep\n")
    (pkg / "app" / "b.py").write_text("import os\n\n\ndef f():\n    from starpo import base\n")
    (pkg / "base" / "c.py").write_text(
        "import json\n"
        "from starpo.app import a\n"                         # at the top
        "\n\ndef g():\n    import starpo.app.b\n"            # inside a function
        "\n\nfrom ..app import b\n")                         # relative
    readme = ("# x\n\n## Layout\n\n```\nsrc/starpo/\n  base/    used by what follows\n"
              "  app/     uses base\n                continued\ntests/   not a layer\n```\n")
    layers = declared_layers(readme)
    assert layers == [["base"], ["app"]]
    assert layer_violations(layers, pkg) == [
        f"starpo/base/c.py:{line}: starpo.base.c imports starpo.app.{m}, but app comes "
        f"after base in the README's layer order" for line, m in ((2, "a"), (6, "b"), (9, "b"))]
    assert layer_violations([["app"], ["base"]], pkg) == [
        "starpo/app/a.py:1: starpo.app.a imports starpo.base.deep, but base comes after app "
        "in the README's layer order",
        "starpo/app/b.py:5: starpo.app.b imports starpo.base, but base comes after app in "
        "the README's layer order"]
