"""The package layout keeps its promises (docs/INTERNALS.md): imports only point down the layers,
no import cycle, a driver never imports another driver, library code never imports the stage
machinery, no module grows past about 600 lines, and INTERNALS lists every module with the summary
(first paragraph) of its docstring."""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "common"

# Lowest first: a module may import from its own package and from packages of a lower layer only.
LAYERS = (("errors", "fileio"), ("runtime", "config"), ("data",), ("ecotaxa", "report"), ("store",),
          ("model", "retrieval"), ("training", "evaluate"), ("pipeline",), ("stages",))
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MAX_LINES = 600
DRIVERS = ("split", "stats", "train", "extract", "threshold", "prune", "inference")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(COMMON.rglob("*.py"))}


def imports_of(name: str, path: Path, *, type_checking: bool = True) -> set[str]:
    """Every ``common`` module ``name`` imports, at module level or inside functions (and inside
    ``if TYPE_CHECKING:`` unless ``type_checking`` is False); ``from pkg import mod`` counts as
    ``pkg.mod`` when ``pkg.mod`` is a module."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for s in node.body for n in ast.walk(s))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("common"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs or [target])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("common"))
    out.discard(name)
    return out


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in modules().items():
        a = package_of(name)
        for target in imports_of(name, path):
            b = package_of(target)
            if a and b and a != b and RANK.get(b, -1) > RANK.get(a, len(LAYERS)):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "an import points up the layers (docs/INTERNALS.md): " + "; ".join(wrong)


def test_no_import_cycle():
    """Tarjan's strongly connected components over every import (function-level ones included,
    ``TYPE_CHECKING`` ones left out: they never run)."""
    mods = modules()
    graph = {n: sorted(t for t in imports_of(n, p, type_checking=False) if t in mods) for n, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # stage 07's driver package imports its own modules, which import its helpers: the one
            # package-internal cycle allowed (an __init__ that is the entry point of its modules)
            if len(comp) > 1 and not all(c.startswith("common.stages.inference") for c in comp):
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_driver_never_imports_another_driver():
    wrong = []
    for name, path in modules().items():
        if not name.startswith("common.stages."):
            continue
        own = name.split(".")[2]
        for target in imports_of(name, path):
            parts = target.split(".")
            if len(parts) > 2 and parts[1] == "stages" and parts[2] in DRIVERS and parts[2] != own:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "; ".join(wrong)


def test_library_code_never_imports_the_stage_machinery():
    wrong = [f"{n} imports {t}" for n, p in modules().items()
             if package_of(n) not in ("pipeline", "stages", None)
             for t in imports_of(n, p) if package_of(t) in ("pipeline", "stages")]
    assert not wrong, "; ".join(wrong)


def test_no_module_past_about_600_lines():
    long = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}


def test_every_module_has_a_docstring_and_internals_shows_the_tree():
    no_doc = [n for n, p in modules().items() if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not no_doc, f"modules without a docstring: {no_doc}"
    text = (ROOT / "docs" / "INTERNALS.md").read_text(encoding="utf-8")
    assert render_tree() in text, ("docs/INTERNALS.md does not show the package tree as it is: print it with "
                                   "`python tests/test_layout.py` and paste it in")


def render_tree() -> str:
    """The tree block of docs/INTERNALS.md: every package and module with its docstring's first line."""
    lines = ["common/"]
    for name, path in modules().items():
        if name == "common":
            continue
        doc = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
        first = " ".join(doc.split("\n\n")[0].split())  # the summary: the first paragraph, on one line
        label = name.rsplit(".", 1)[1] + "/" if path.name == "__init__.py" else path.name
        depth = name.count(".")
        lines.append(f"{'  ' * depth}{label:<{26 - 2 * depth}} {first}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":  # print the tree for docs/INTERNALS.md
    print(render_tree())
