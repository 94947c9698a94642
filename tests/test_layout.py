"""The house rules, checked on the code itself: imports point one way between the rooms, no circle, no private name
crosses a module, the light paths stay light, and every command of the parser has its handler in cli.py."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hamtune"
# The flow, upstream first: a module may import its own room and rooms before it, never one after it.
ROOMS = ["shared", "data", "training", "reports", "search", "final", "serve", "cli"]
SHARED = {"hamtune", "hamtune.vocab", "hamtune.errors", "hamtune.io"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module == "hamtune.cli":
        return "cli"
    return module.split(".")[1]


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every hamtune import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("hamtune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hamtune"):
            names = [a.name for a in node.names]
            found.append((node.module, names, node.lineno))
            # `from hamtune.search import tables` imports the submodule hamtune.search.tables
            found += [(f"{node.module}.{n}", [], node.lineno) for n in names
                      if (PACKAGE.parent / f"{node.module}.{n}".replace(".", "/")).with_suffix(".py").is_file()]
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_sits_in_a_room_and_the_top_level_holds_only_the_shared_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "errors.py", "io.py", "vocab.py"], top
    assert {room(m) for m in MODULES} == set(ROOMS)
    for name in ROOMS[1:-1]:  # each room says what it holds and what it may import
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "import" in doc, name


def test_imports_point_only_upstream_between_rooms():
    climbs = []
    for module, path in MODULES.items():
        for imported, _, line in imports_of(path):
            if ROOMS.index(room(imported)) > ROOMS.index(room(module)):
                climbs.append(f"{path.relative_to(ROOT)}:{line}: {module} ({room(module)}) imports {imported}")
    assert not climbs, "\n".join(climbs)


def test_no_import_circle_between_modules():
    graph = {m: {i for i, _, _ in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages work, not a circle
    graph = {m: {i for i in deps if not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1 and not cycle:
                cycle.extend(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, " -> ".join(cycle)


def test_no_private_name_crosses_a_module():
    crossings = []
    for module, path in MODULES.items():
        for imported, names, line in imports_of(path):
            crossings += [f"{path.relative_to(ROOT)}:{line}: {imported}.{n}" for n in names
                          if n.startswith("_") and n != "__version__"]
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name.split(".")[-1] for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names
                   if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hamtune"))
                   or a.name.startswith("hamtune")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                crossings.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not crossings, "\n".join(crossings)


def _modules_after(code: str) -> set[str]:
    """Every module (with submodules) loaded by a fresh interpreter after running `code` (a fresh process, as a Ray
    worker is)."""
    script = f"import os; os.chdir({str(ROOT)!r})\n{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_a_trial_imports_no_matplotlib_and_no_optuna():
    # What a Ray worker (ray already loaded) imports to run a trial: the trainable and, through it, the loop.
    loaded = _modules_after("import ray, hamtune.search.trainable")
    assert {"torch", "ray"} <= _tops(loaded) and "hamtune.training.loop" in loaded  # the probe sees the real path
    assert "matplotlib" not in _tops(loaded)
    assert "optuna" not in _tops(loaded)  # the searcher runs on the driver only
    assert not {m for m in loaded if m.startswith(("hamtune.reports", "hamtune.final", "hamtune.serve"))}


@pytest.mark.parametrize("code", [
    "from hamtune.search.spec import load_spec; load_spec('search_spaces/default.yaml')",
    "import hamtune.training.config, hamtune.io, hamtune.search.tables",
])
def test_checking_a_spec_or_reading_results_imports_no_training_loop(code):
    loaded = _modules_after(code)
    assert "hamtune.search.spec" in loaded or "hamtune.search.tables" in loaded  # the probe sees hamtune's modules
    assert not {m for m in loaded if m.startswith(("hamtune.training.loop", "hamtune.training.model",
                                                    "hamtune.training.batches"))}
    assert not {"matplotlib", "ray"} & _tops(loaded)  # (timm, which checks model names, loads torch)


def test_the_command_line_imports_no_ray_and_hands_every_command_to_its_handler():
    loaded = _modules_after("import hamtune.cli")
    assert "hamtune.cli" in loaded and not {"ray", "torch", "optuna"} & _tops(loaded)
    import argparse

    import hamtune.cli as cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"data", "search", "results", "best", "evaluate", "predict", "serve"}
    source = (PACKAGE / "cli.py").read_text()
    for name in commands:
        handler = getattr(cli, f"cmd_{name}", None)
        assert callable(handler), name
        assert f'"{name}": cmd_{name}' in source, f"main() does not dispatch {name!r} to cmd_{name}"
    assert len(source.splitlines()) < 250


def test_the_download_command_offers_exactly_the_known_data_sets():
    from hamtune.cli import build_parser
    from hamtune.data.download import DATASETS

    args = build_parser().parse_args(["data", "download", "all"])
    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["data"]._subparsers
                   ._group_actions[0].choices["download"]._actions if a.dest == "dataset").choices
    assert args.dataset == "all" and set(choices) == {*DATASETS, "all"}
