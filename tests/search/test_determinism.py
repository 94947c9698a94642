"""A search that does not miss and does not depend on timing: the start-up covers every choice, the same spec and seed
give the same trials on a quiet and on a loaded machine, and `hamtune results` says what each choice got."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hamtune.search.spec import spec_from_dict
from hamtune.search.startup import start_up_points

pytestmark = pytest.mark.slow
STRATEGIES = ["none", "weighted_loss", "oversample", "focal"]


def tiny_spec(cache_dir: Path, experiment: str, **search) -> dict:
    return {
        "experiment": experiment,
        "data": {"source": "synthetic", "synthetic_size": 300, "image_size": 16, "cache_dir": str(cache_dir)},
        "model": {"name": "resnet10t", "head_hidden": 16, "head_dropout": 0.1},
        "train": {"epochs": 3, "batch_size": 32, "warmup_epochs": 0.5, "num_threads": 1},
        "search": {"num_samples": 7, "max_concurrent": 2, "startup_trials": 5, "grace_period": 1,
                   "reduction_factor": 2, "seed": 4, **search},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-4, 3e-2]}, "augment_strength": {"uniform": [0, 1]},
                  "imbalance": {"choice": STRATEGIES}},
    }


def in_order(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials in the searcher's order, without the columns that differ between runs (ids, times)."""
    keep = ["status", "epochs", "best_epoch", "config.lr", "config.augment_strength", "config.imbalance",
            "best_val_balanced_accuracy", "best_val_loss", "last_val_loss"]
    return trials.sort_values("trial_index")[keep].reset_index(drop=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, ray_local):
    """The same spec and seed twice: alone, and beside another heavy job (a process that keeps one of the two cores
    busy the whole time, so the trials run at other speeds and finish in another order)."""
    from hamtune.search.driver import run_search

    tmp = tmp_path_factory.mktemp("determinism")
    outcomes = {}
    for name, load in (("quiet", 0), ("loaded", 1)):
        spec = spec_from_dict(tiny_spec(tmp / "cache", name), source="tiny.yaml")
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            outcomes[name] = run_search(spec, results_dir=tmp / "results", verbose=0)
        finally:
            for b in burners:
                b.kill()
                b.wait()
    return tmp, outcomes


def test_the_start_up_tries_every_choice(two_runs):
    tmp, outcomes = two_runs
    trials = outcomes["quiet"].trials.sort_values("trial_index")
    assert set(trials["config.imbalance"].head(5)) == set(STRATEGIES)  # all four before TPE models anything
    spec = spec_from_dict(tiny_spec(tmp / "cache", "quiet"))
    assert [p["imbalance"] for p in start_up_points(spec)] == list(trials["config.imbalance"].head(5))


def test_the_same_seed_gives_the_same_trials_under_load(two_runs):
    _, outcomes = two_runs
    quiet, loaded = (in_order(outcomes[name].trials) for name in ("quiet", "loaded"))
    assert (quiet["status"] == "stopped").any(), "ASHA stopped nothing: the decisions were never tested"
    pd.testing.assert_frame_equal(quiet, loaded, check_exact=False, rtol=1e-4)


def test_a_search_killed_and_resumed_makes_the_same_trials_and_decisions(two_runs):
    """kill -9 of the driver (and its Ray) mid-search, then --resume: the same trials, stopped at the same rungs,
    as the uninterrupted run; the scheduler's rungs and the searcher's waves come back from the tables and Tune."""
    import yaml

    from hamtune.search import tables as res

    tmp, outcomes = two_runs
    raw = tiny_spec(tmp / "cache", "resumed")
    path = tmp / "resumed.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "hamtune.cli", "search", "--results-dir", str(tmp / "results")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([*cmd, "--space", str(path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exp = tmp / "results" / "resumed"
    killed_after = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (exp / "trials.parquet").is_file():
                t = pd.read_parquet(exp / "trials.parquet")
                ended = t[t["status"].isin(["completed", "stopped"])]
                if len(ended) >= 3:  # past the first rung decisions, before the last wave
                    killed_after = len(ended)
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert killed_after is not None and killed_after < 7, "the search ended before it could be killed"
    resumed = subprocess.run([*cmd, "--resume", "resumed"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials, _ = res.load_tables(exp)
    pd.testing.assert_frame_equal(in_order(outcomes["quiet"].trials), in_order(trials), check_exact=False,
                                  rtol=1e-4)


def test_results_say_how_far_each_choice_got(two_runs):
    tmp, outcomes = two_runs
    done = subprocess.run([sys.executable, "-m", "hamtune.cli", "results", "quiet", "--results-dir",
                           str(tmp / "results")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(text for text in done.stdout.splitlines() if text.startswith("imbalance: "))
    trials = outcomes["quiet"].trials
    for strategy in STRATEGIES:
        got = trials[trials["config.imbalance"] == strategy]
        word = "trial" if len(got) == 1 else "trials"
        assert f"{strategy}: {len(got)} {word}" in line, line
        if len(got):
            assert f"furthest epoch {int(got['epochs'].max())}" in line.split(f"{strategy}: ")[1].split(";")[0]


def test_a_budget_below_a_choice_is_said_in_one_line(tmp_path):
    import yaml

    raw = tiny_spec(tmp_path / "cache", "short", num_samples=3)
    raw["train"]["epochs"] = 1
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--space", str(path), "--results-dir",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [text for text in done.stdout.splitlines() if text.startswith("hamtune: note:")]
    assert notes == ["hamtune: note: search.num_samples 3 is fewer than the 4 values of space.imbalance: 1 of them "
                     "will never be tried"]
    assert "imbalance: " in done.stdout and ": 0 trials" in done.stdout
