"""The module map stays light where it must: a trial's import path and a spec check load no plotting and no loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded by a fresh interpreter after running `code` (a fresh process, as a Ray worker is)."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_trial_imports_no_matplotlib():
    # What a Ray worker (ray already loaded) imports to run a trial: the trainable and, through it, the loop.
    loaded = _modules_after("import ray, hamtune.trainable")
    assert "torch" in loaded and "ray" in loaded  # the probe works: the trial's real dependencies are there
    assert "matplotlib" not in loaded
    assert "optuna" not in loaded  # the searcher runs on the driver only


@pytest.mark.parametrize("code", [
    "from hamtune.space import load_spec; load_spec('search_spaces/default.yaml')",
    "import hamtune.config, hamtune.io, hamtune.results",
])
def test_checking_a_spec_or_reading_results_imports_no_training_loop(code):
    loaded = _modules_after(f"import os; os.chdir({str(__import__('pathlib').Path(__file__).parents[1])!r}); {code}")
    assert "matplotlib" not in loaded
    assert "ray" not in loaded


def test_every_command_lives_in_cli():
    import hamtune.cli as cli

    parser_commands = {"data", "search", "results", "best", "evaluate", "predict"}
    for name in parser_commands:
        assert callable(getattr(cli, f"cmd_{name}")), name
    import importlib.util

    assert importlib.util.find_spec("hamtune.best") is None  # the five-job module is gone
