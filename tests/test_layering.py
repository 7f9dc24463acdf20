"""The package's import graph: no cycles, and no import from a lower layer to a higher one.

Every import is counted, at module level and inside functions (a lazy import is still a dependency). The layers,
low to high (a module may import its own layer and any below):

  core (nn, data, losses, generation, checkpoints, run_layout, metrics, zoo, dtypes, finite_weights, file_lock)
  < models < objectives < convert (checkpoint formats) < registry, finetune < runs (a run directory as a model)
  < tools that take a loaded model (evaluation, capfilt, predictor, serve, serve_replicate, caption_dir)
  < api, train < cli < the package face (``blip/__init__.py``, which nothing inside the package imports).
"""
from __future__ import annotations

import ast
from pathlib import Path

import blip

PACKAGE = Path(blip.__file__).resolve().parent
LAYERS = [
    {"nn", "data", "losses", "generation", "checkpoints", "run_layout", "metrics", "zoo", "dtypes", "finite_weights",
     "file_lock"},
    {"models"},
    {"objectives"},
    {"convert"},
    {"registry", "finetune"},
    {"runs"},
    {"evaluation", "capfilt", "predictor", "serve", "serve_replicate", "caption_dir"},
    {"api", "train"},
    {"cli"},
]
FACE = len(LAYERS)   # the package itself: ``import blip``


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The blip modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return FACE
    found = [i for i, members in enumerate(LAYERS) if parts[1] in members]
    assert found, f"{name} is in no layer: add it to LAYERS"
    return found[0]


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert not wrong, "imports that go up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_the_package_face():
    """``import blip`` / ``from blip import load`` inside the package hide which module is used (and run the whole
    package's init): modules import what they use from the module that defines it."""
    wrong = sorted(name for name, targets in graph().items() if name != "blip" and "blip" in targets)
    assert not wrong, "modules importing the bare package `blip`:\n" + "\n".join(wrong)


def test_the_walk_sees_function_level_imports():
    g = graph()
    assert "blip.objectives.blip_pretrain" in g["blip.registry"]   # imported inside a builder function
    assert "blip.models.blip" in g["blip.registry"] and "blip.losses.itc" in g["blip.losses"]


def test_every_module_has_a_layer():
    assert all(layer(name) <= FACE for name in modules())


def test_the_order_of_the_application_layers():
    assert layer("blip.metrics.vqa") == layer("blip.run_layout") == 0
    assert layer("blip.convert.formats") < layer("blip.registry") < layer("blip.runs") < layer("blip.evaluation.runner")
    assert layer("blip.evaluation.runner") < layer("blip.api") == layer("blip.train.run") < layer("blip.cli")
