"""The dependency rule of the package layout (README, "Architecture"), checked on the source.

Every import is read from the AST, function-local ones included, so a lazy import cannot
hide an arrow that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "pipeline", "stages")
FOUNDATION = {
    "pipeline.config",
    "pipeline.head_params",
    "pipeline.data",
    "pipeline.models",
    "pipeline.device",
    "pipeline.errors",
    "pipeline.version",
    "pipeline.blocks",
    "pipeline.outputs",
    "pipeline.progress",
}
SHARED = {"stages", "stages.entries", "stages.report"}
STAGES = ("stages.extract", "stages.score", "stages.train")


def layer(module: str) -> int:
    """0 store, 1 foundation, 2 entries and report, 3 extract/score/train, 4 predict, 5 driver."""
    top = ".".join(module.split(".")[:2])
    if module.split(".")[0] == "store":
        return 0
    if top in FOUNDATION:
        return 1
    if top in SHARED:
        return 2
    if top in STAGES:
        return 3
    if top == "stages.predict":
        return 4
    if module.split(".")[0] == "pipeline":
        return 5
    raise AssertionError(module)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, m, known) for m, p in known.items()}


def test_layer_table_covers_every_module():
    for m in modules():
        layer(m)


def test_no_import_runs_back_up():
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert not bad, "\n".join(bad)


def test_stages_do_not_import_each_other():
    def stage(m):
        return next((s for s in STAGES if m == s or m.startswith(s + ".")), None)

    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in deps if stage(m) and stage(d) and stage(m) != stage(d)]
    assert not bad, "\n".join(bad)


def test_store_knows_nothing_of_models():
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m.split(".")[0] == "store" for d in deps if d.split(".")[0] != "store"]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            # a package's __init__ re-exporting its own submodules is not a cycle between files
            if m == d.rpartition(".")[0]:
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checker itself: a function-local import from a stage to the driver is found."""
    pkg = tmp_path / "stages" / "score"
    pkg.mkdir(parents=True)
    (pkg / "runner.py").write_text("def f():\n    from pipeline.orchestrate import feature_requests\n")
    known = {"stages.score.runner": pkg / "runner.py", "pipeline.orchestrate": tmp_path / "o.py"}
    deps = imports(pkg / "runner.py", "stages.score.runner", known)
    assert deps == {"pipeline.orchestrate"} and layer("pipeline.orchestrate") > layer("stages.score.runner")
