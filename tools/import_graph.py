"""The import graph of saef: check its layering rules and draw it.

    python tools/import_graph.py                          # check; exit 1 and list the violations if any
    python tools/import_graph.py --draw docs/import-graph.png

Layers, lowest first (a module may import its own layer and the layers below it, as listed):

    base       saef.files, saef._version  nothing of saef
    compress   saef.compress.*            compress
    core       saef.core.*                compress, core
    zoo        saef.zoo.*                 base, zoo
    backends   saef.backends.*            compress, core, backends (no backend imports another)
    app        saef.app.* but the CLI     base, compress, core, zoo, app, and of the backends only
                                          saef.backends.registry (and its Backend base)
    studies    saef.studies.*             base, app, studies (a study runs `saef train` in child
                                          processes and reads their records with saef.app.records/plots)
    cli        saef.app.cli               what app may import, and studies: the command line is the
                                          top of the application, dispatching `train`/`plot` to the app
                                          and `reproduce` to the studies
    saef       the package root           anything (it re-exports the public API)

Also: no import cycles (a package's ``__init__`` re-exporting its modules does not count as an edge into
the package, as in ``../shared/tools/shape.py``). The test suite runs the check (``tests/test_layers.py``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent / "src" / "saef"
LAYERS = ["base", "compress", "core", "zoo", "backends", "app", "studies", "cli", "saef"]
CLI = "saef.app.cli"
BASE = {"saef.files", "saef._version"}
ALLOWED = {
    "base": set(),
    "compress": {"compress"},
    "core": {"compress", "core"},
    "zoo": {"base", "zoo"},
    "backends": {"compress", "core", "backends"},
    "app": {"base", "compress", "core", "zoo", "app", "backends"},
    "studies": {"base", "app", "studies"},
    "cli": {"base", "compress", "core", "zoo", "app", "backends", "studies"},
    "saef": set(LAYERS),
}
# Within the backends, each backend is a unit of its own; base and registry are shared.
BACKEND_UNITS = {"saef.backends.simulator": "sim", "saef.backends.inprocess": "sim", "saef.backends.stacked": "sim",
                 "saef.backends.distributed": "dist"}


def unit_of(module: str):
    """The backend unit ``module`` belongs to (a backend may be a package: its modules are its unit), or None."""
    for name, unit in BACKEND_UNITS.items():
        if module == name or module.startswith(name + "."):
            return unit
    return None


APP_MAY_IMPORT_FROM_BACKENDS = {"saef.backends.registry", "saef.backends.base", "saef.backends"}


def modules(root: Path = ROOT) -> Dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = ["saef", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The saef modules ``name`` imports (anywhere in the file, lazily or not), as module names."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from .pkg import module` names a module; `from .mod import f` does not
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module == CLI:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "saef"


def graph(root: Path = ROOT) -> Dict[str, Set[str]]:
    found = modules(root)
    return {name: _imports(name, path, set(found)) for name, path in found.items()}


def _is_package(module: str, edges: Dict[str, Set[str]]) -> bool:
    return any(other.startswith(module + ".") for other in edges)


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (edges into a package's face excluded)."""
    plain = {m: {d for d in ds if not _is_package(d, edges)} for m, ds in edges.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in plain[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in plain:
        if v not in index:
            visit(v)
    return found


def violations(edges: Dict[str, Set[str]]) -> List[str]:
    """Every import that breaks a layering rule of the module docstring, and every cycle."""
    problems = []
    for module, targets in sorted(edges.items()):
        layer = layer_of(module)
        for target in sorted(targets):
            if layer_of(target) not in ALLOWED[layer]:
                problems.append(f"{module} imports {target}: layer {layer} may not import layer {layer_of(target)}")
            elif layer in ("app", "cli") and layer_of(target) == "backends" and target not in APP_MAY_IMPORT_FROM_BACKENDS:
                problems.append(f"{module} imports {target}: the app reaches backends through saef.backends.registry only")
            elif unit_of(module) and unit_of(target) and unit_of(module) != unit_of(target):
                problems.append(f"{module} imports {target}: one backend imports another")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    return problems


def draw(edges: Dict[str, Set[str]], out: Path) -> None:
    """The graph as a PNG: one row per layer (lowest at the bottom), arrows from importer to imported."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: Dict[str, List[str]] = {layer: sorted(m for m in edges if layer_of(m) == layer) for layer in LAYERS}
    position: Dict[str, Tuple[float, float]] = {}
    for y, layer in enumerate(LAYERS):
        names = rows[layer]
        for i, name in enumerate(names):
            position[name] = ((i + 0.5) / max(len(names), 1), y)
    fig = Figure(figsize=(20, 10))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for module, targets in edges.items():
        face = _is_package(module, edges)  # a package's __init__ re-exporting its modules: drawn faint
        for target in targets:
            (x0, y0), (x1, y1) = position[module], position[target]
            if y0 == y1:  # within a layer: an arc above the row
                style = dict(connectionstyle=f"arc3,rad={-0.35 if x1 > x0 else 0.35}", color="tab:red")
                start, end = (x0, y0 + 0.1), (x1, y1 + 0.1)
            else:
                style = dict(connectionstyle="arc3,rad=0.0", color="0.55")
                start, end = (x0, y0 - 0.1), (x1, y1 + 0.1)
            ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=0.3 if face else 0.7,
                                                                  alpha=0.35 if face else 0.9, **style))
    for name, (x, y) in position.items():
        label = name.replace("saef.", "", 1) if name != "saef" else "saef"
        ax.text(x, y, label, ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.3", lw=0.6))
    for y, layer in enumerate(LAYERS):
        ax.text(-0.02, y, layer, ha="right", va="center", fontsize=10, fontweight="bold")
    ax.set_xlim(-0.12, 1.02)
    ax.set_ylim(-0.6, len(LAYERS) - 0.4)
    ax.axis("off")
    problems = violations(edges)
    ax.set_title(f"saef imports: {len(edges)} modules, {sum(map(len, edges.values()))} edges, "
                 f"{len(cycles(edges))} cycles, {len(problems)} layering violations (grey: to a lower layer; red: within a layer; faint: a package re-exporting its modules)",
                 fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draw", metavar="PNG", help="also draw the graph into this file")
    args = parser.parse_args(argv)
    edges = graph()
    problems = violations(edges)
    for problem in problems:
        print(problem)
    if args.draw:
        draw(edges, Path(args.draw))
        print(f"wrote {args.draw}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(problems)} violations")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
