"""The official ISIC scorer (isic-challenge-scoring) in its own virtual environment, built once and reused.

The scorer calls DataFrame.applymap, which pandas 3 removed, so it cannot run in hamtune's environment. Its venv
lives outside $HAMTUNE_CACHE_DIR (which the tests point at a fresh folder every session) so that it is built once
per machine, not once per test run: ~/.cache/hamtune-test/, or $HAMTUNE_SCORER_ENV. Building needs only PyPI.

Run `python tests/scorer_env.py` to build it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCORER = "isic-challenge-scoring==5.6.0"
REQUIREMENTS = (SCORER, "pandas<3")
ENV_DIR = Path(os.environ.get("HAMTUNE_SCORER_ENV")
               or Path.home() / ".cache" / "hamtune-test" / "isic-challenge-scoring-5.6.0")
BUILD_TIMEOUT_S = 1200


def scorer_python() -> Path:
    """The scorer venv's python, building the venv first if it is not complete (a file lock serialises builders)."""
    python = ENV_DIR / "bin" / "python"
    marker = ENV_DIR / ".complete"
    expected = {"requirements": list(REQUIREMENTS)}
    if _read_json(marker) == expected:
        return python
    ENV_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(ENV_DIR.parent / f".{ENV_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_json(marker) == expected:
            return python
        tmp = ENV_DIR.with_name(f".tmp-{ENV_DIR.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
        try:
            subprocess.run([base, "-m", "venv", str(tmp)], check=True, timeout=300)
            subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", *REQUIREMENTS], check=True, timeout=BUILD_TIMEOUT_S)
            (tmp / ".complete").write_text(json.dumps(expected))
            shutil.rmtree(ENV_DIR, ignore_errors=True)
            os.rename(tmp, ENV_DIR)  # `python -m ...` works from the renamed venv; its console scripts would not
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python


def official_score(truth_csv: Path, submission_csv: Path) -> dict:
    """`isic-challenge-scoring classification TRUTH PREDICTION` as JSON (balanced accuracy is the target metric)."""
    done = subprocess.run(
        [str(scorer_python()), "-m", "isic_challenge_scoring", "--output", "json", "classification",
         str(truth_csv), str(submission_csv)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        raise RuntimeError(f"isic-challenge-scoring failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return json.loads(done.stdout)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    print(scorer_python())
