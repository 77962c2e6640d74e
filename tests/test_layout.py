"""The house rules of ptqd's layout (shared/ARCHITECTURE.md), checked on the source itself:

- no import cycle between ptqd modules, function-local imports included;
- no ``_private`` name of one module imported or used by another (tests included);
- the package layers import only downwards (pure packages never import stages, tools or the CLI);
- ``api.py`` stays a thin shell and no file in ``ptqd/`` outgrows one screenful of concerns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ptqd"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(tree: ast.AST, this: str, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(target module, names imported from it, line) for every import anywhere in the file."""
    out = []
    pkg = this if modules.get(this, Path()).name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ptqd":
                    out.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "ptqd":
                continue
            plain = []
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:  # `from ptqd.x import submodule`
                    out.append((sub, [], node.lineno))
                else:
                    plain.append(a.name)
            if plain:
                out.append((base, plain, node.lineno))
    return out


def module_aliases(tree: ast.AST, modules: dict[str, Path]) -> dict[str, str]:
    """Local names bound to ptqd modules (``from ptqd import api``, ``import ptqd.x as y``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ptqd") and a.asname:
                    names[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ptqd"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    names[a.asname or a.name] = sub
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _, _ in imports_of(ast.parse(path.read_text()), m, modules):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != m:
                edges[m].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle (function-local imports count): " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def private_uses(path: Path, this: str, modules: dict[str, Path]) -> list[str]:
    tree = ast.parse(path.read_text())
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    bad = [f"{where}:{line}: imports {n} from {target}"
           for target, names, line in imports_of(tree, this, modules) if target != this
           for n in names if is_private(n)]
    aliases = module_aliases(tree, modules)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and is_private(node.attr) and aliases[node.value.id] != this):
            bad.append(f"{where}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    # another object's private attribute (``engine._last``): only ``self``/``cls`` reach into their own
    own = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
           and n.value.id in ("self", "cls")}
    own |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and not (isinstance(node.value, ast.Name) and node.value.id in aliases)):
            bad.append(f"{where}:{node.lineno}: reaches into another object's {node.attr}")
    return bad


def test_no_private_names_across_modules():
    modules = all_modules()
    bad = []
    for m, path in modules.items():
        bad += private_uses(path, m, modules)
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bad += private_uses(path, module_name(path), modules)
    for path in sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py")):
        bad += private_uses(path, "", modules)
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def test_private_checker_catches_a_private_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from ptqd.bundle.store import _write_atomic\nfrom ptqd import api\napi._secret\n"
                 "def f(engine):\n    engine._last = None\n")
    found = private_uses(f, "", all_modules())
    assert len(found) == 3, found


# Which layer may import which: a module of a lower layer never imports a higher one.
LAYERS = [
    ("ptqd.version", "ptqd.errors", "ptqd.validate", "ptqd.precision", "ptqd.progress", "ptqd.resources", "ptqd.facts",
     "ptqd.budget", "ptqd.memory", "ptqd.bundle"),
    ("ptqd.models", "ptqd.exporter", "ptqd.calib", "ptqd.engines", "ptqd.runtime", "ptqd.cluster"),
    ("ptqd.stages",),
    ("ptqd.api", "ptqd.tools"),
    ("ptqd.cli",),
]


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_layers_import_downwards():
    edges = graph()
    bad = [f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})" for m, ns in sorted(edges.items())
           for n in sorted(ns) if layer_of(m) is not None and layer_of(n) is not None and layer_of(n) > layer_of(m)]
    unplaced = [m for m in edges if m != "ptqd" and layer_of(m) is None]
    assert not unplaced, f"modules outside the layer table: {unplaced}"
    assert not bad, "\n".join(bad)


def test_runtime_never_imports_torch_modules():
    """The runtime's own modules import neither torch nor a torch-using ptqd module."""
    edges = graph()
    torchy = {m for m, p in all_modules().items() if "import torch" in p.read_text()}
    for m in edges:
        if m.startswith("ptqd.runtime"):
            assert m not in torchy, f"{m} imports torch"


def test_file_sizes():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"
    assert len((PKG / "api.py").read_text().splitlines()) <= 150


@pytest.mark.parametrize("module", ["ptqd.precision", "ptqd.bundle.layout", "ptqd.stages.build"])
def test_layout_modules_exist(module):
    assert module in all_modules()


def test_every_ptqd_import_resolves():
    """Function-local imports fail only when they run: check every one names a module (and a name in it)."""
    import importlib

    modules = all_modules()
    bad = []
    roots = [PKG, ROOT / "tests", ROOT / "benchmarks", ROOT / "scripts"]
    for path in sorted(p for r in roots for p in r.rglob("*.py")):
        this = module_name(path) if path.is_relative_to(PKG) else ""
        for target, names, line in imports_of(ast.parse(path.read_text()), this, modules):
            if target not in modules:
                bad.append(f"{path.relative_to(ROOT)}:{line}: no module {target}")
                continue
            if names and "*" not in names:
                mod = importlib.import_module(target)
                bad += [f"{path.relative_to(ROOT)}:{line}: {target} has no {n}" for n in names if not hasattr(mod, n)]
    assert not bad, "\n".join(bad)
