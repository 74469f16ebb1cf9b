"""The import rules of ARCHITECTURE.md, read from the source with ast (nothing is imported):

- models/ and hw_profiles/ import nothing from search/;
- inside search/, subpackages import only downward:
  compression < engine, cost < study < report, export < api < cli (search.errors: anyone);
- no import cycle between modules;
- no underscore name imported across subpackages;
- Optuna's private modules and attributes are reached only from search/study/storage.py;
- project modules are imported at module top, except in search/cli/ (start-up time).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "models", "hw_profiles")
# a subpackage may import those of a strictly lower level, and itself; siblings not
LEVEL = {"errors": 0, "compression": 1, "engine": 2, "cost": 2, "study": 3, "report": 4, "export": 4,
         "api": 5, "cli": 6}
OPTUNA_ADAPTER = "search.study.storage"
OPTUNA_PRIVATE_ATTRS = {"_storage", "_trial_id", "_study_id", "_backend", "_cached_frozen_trial"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, bool, int]]:
    """(imported module, imported name or None, at module top, line) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, id(node) in top, node.lineno) if sub in MODULES
                           else (base, a.name, id(node) in top, node.lineno))
    return out


def _project(mod: str) -> str | None:
    """The project module an import refers to (longest known prefix), None for a library."""
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in MODULES:
            return cand
    return None


def _subpackage(mod: str) -> str:
    """"compression" for search.compression.masks, "api" for search.api, "models" for models.x."""
    parts = mod.split(".")
    return parts[1] if parts[0] == "search" and len(parts) > 1 else parts[0]


EDGES = {name: [(_project(m), n, top, line) for m, n, top, line in _imports(name, path)]
         for name, path in MODULES.items()}


def test_there_are_modules_to_check():
    assert len(MODULES) > 40 and "search.study.storage" in MODULES and "search.cli" in MODULES


def test_models_and_profiles_import_nothing_from_search():
    bad = [f"{src}:{line} imports {dst}" for src, edges in EDGES.items() if src.split(".")[0] != "search"
           for dst, _, _, line in edges if dst and dst.split(".")[0] == "search"]
    assert not bad, "\n".join(bad)


def test_search_subpackages_import_downward_only():
    bad = []
    for src, edges in EDGES.items():
        if not src.startswith("search.") or src == "search":
            continue
        s = _subpackage(src)
        for dst, _, _, line in edges:
            if not dst or not dst.startswith("search.") or dst == "search":
                continue
            d = _subpackage(dst)
            if d != s and not LEVEL[d] < LEVEL[s]:
                bad.append(f"{src}:{line} ({s}) imports {dst} ({d})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {src: {dst for dst, _, _, _ in edges if dst and dst != src} for src, edges in EDGES.items()}
    # a package's __init__ is imported with each of its modules: count it as an edge too
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_a_subpackage():
    bad = []
    for src, edges in EDGES.items():
        for dst, name, _, line in edges:
            private = (name or "").startswith("_") or any(p.startswith("_") and not p.startswith("__")
                                                            for p in (dst or "").split("."))
            if dst and private and _subpackage(dst) != _subpackage(src):
                bad.append(f"{src}:{line} imports {dst}.{name}")
    assert not bad, "\n".join(bad)


def test_optuna_internals_only_in_the_storage_adapter():
    bad = []
    for name, path in MODULES.items():
        if name == OPTUNA_ADAPTER:
            continue
        for mod, imported, _, line in _imports(name, path):
            if mod.split(".")[0] == "optuna" and any(p.startswith("_") for p in mod.split(".") + [imported or ""]):
                bad.append(f"{name}:{line} imports {mod} {imported or ''}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in OPTUNA_PRIVATE_ATTRS:
                bad.append(f"{name}:{node.lineno} reads .{node.attr}")
    assert not bad, "\n".join(bad)


def test_project_modules_are_imported_at_module_top():
    # the CLI imports lazily so that `hwcompress --help` does not load JAX
    bad = [f"{src}:{line} imports {dst} inside a function" for src, edges in EDGES.items()
           if not src.startswith("search.cli") for dst, _, top, line in edges if dst and not top]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("rule", ["downward", "private", "optuna"])
def test_the_checks_catch_a_violation(rule, tmp_path):
    """Each rule fails on a hand-written violation (the checks are not vacuous)."""
    src = {"downward": "from search.api import compress\n",
           "private": "from search.study.spec import _first_difference\n",
           "optuna": "from optuna._hypervolume import compute_hypervolume\n"}[rule]
    path = tmp_path / "bad.py"
    path.write_text(src)
    ((mod, name, _, _),) = _imports("search.compression.bad", path)
    dst = _project(mod)
    if rule == "downward":
        assert not LEVEL[_subpackage(dst)] < LEVEL["compression"]
    elif rule == "private":
        assert name.startswith("_") and _subpackage(dst) != "compression"
    else:
        assert mod.split(".")[0] == "optuna" and mod.split(".")[1].startswith("_")


def test_public_face_resolves_lazily():
    import subprocess
    import sys

    import search

    for name in search.__all__:
        assert getattr(search, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        search.nope  # noqa: B018
    # `import search` and the CLI's parser load no JAX: `hwcompress --help` stays fast
    code = "import sys, search, search.cli; search.cli.build_parser(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
