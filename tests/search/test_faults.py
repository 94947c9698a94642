"""A search survives its workers and refuses a twin: a worker SIGKILLed once is retried from its checkpoint and every
trial ends; workers Ray's memory monitor keeps killing end the search in one line with the tables not saying
`running`; a second search of the same name while the first writes it is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hamtune.search import tables as res

pytestmark = pytest.mark.slow


def tiny_spec(cache_dir: Path, experiment: str, **search) -> dict:
    return {
        "experiment": experiment,
        "data": {"source": "synthetic", "synthetic_size": 300, "image_size": 16, "cache_dir": str(cache_dir)},
        "model": {"name": "resnet10t", "head_hidden": 16, "head_dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0.5, "num_threads": 1},
        "search": {"num_samples": 3, "max_concurrent": 1, "searcher": "random", "scheduler": "fifo", "seed": 0,
                   "max_failures": 1, **search},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-3, 1e-2]}},
    }


def spec_file(tmp_path: Path, experiment: str, **search) -> Path:
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "cache", experiment, **search)))
    return path


def search(tmp_path: Path, spec: Path, *extra: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "hamtune.cli", "search", "--space", str(spec), "--results-dir",
                             str(tmp_path / "results"), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_a_worker_killed_once_is_retried_and_every_trial_ends(tmp_path):
    marker = tmp_path / "killed"
    code, out, err = finish(search(tmp_path, spec_file(tmp_path, "killed"),
                                   env={"HAMTUNE_INJECT_KILL": str(marker)}))
    assert marker.exists(), "the injected SIGKILL never happened"
    assert code == 0, err[-3000:]
    trials, history = res.load_tables(tmp_path / "results" / "killed")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}, trials[["status", "message"]]
    assert res.read_experiment(tmp_path / "results" / "killed")["state"] == "finished"
    # the killed trial came back from its epoch-1 checkpoint: one history row per epoch, none repeated from scratch
    assert len(history) == 6 and not history.duplicated(["trial_id", "epoch"]).any()
    # the retry is said in one line, not in Tune's traceback
    retried = [line for line in err.splitlines() if "starts again from its last checkpoint" in line]
    assert len(retried) == 1 and "error.txt" in retried[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_workers_the_memory_monitor_keeps_killing_end_the_search_in_one_line(tmp_path):
    """A memory threshold far below what the machine uses: Ray's memory monitor kills every trial worker."""
    code, out, err = finish(search(tmp_path, spec_file(tmp_path, "oom", max_failures=1), env={
        "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}))
    assert code == 2, (out[-2000:], err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("hamtune: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "memory monitor" in errors[0] and "lower search.max_concurrent" in errors[0], errors[0]
    # the killed workers' own last words stay in Ray's logs: hamtune's line is the last thing said, and no traceback
    assert err.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    exp = tmp_path / "results" / "oom"
    assert res.read_experiment(exp)["state"] != "running"
    if (exp / "trials.parquet").is_file():
        trials, _ = res.load_tables(exp)
        assert not set(trials["status"]) & {"running", "pending"}, trials["status"].tolist()


def test_a_second_search_of_the_same_name_is_refused_while_the_first_runs(tmp_path):
    """The first search is this test process holding the experiment's lock, as a running search does (the same
    lock, hamtune.search.lock); a second one, as a new search and as a resume, is refused in one line naming it."""
    from hamtune.search.lock import experiment_lock

    spec = spec_file(tmp_path, "twin")
    exp = tmp_path / "results" / "twin"
    with experiment_lock(exp):
        (exp / res.EXPERIMENT_FILE).write_text('{"name": "twin", "state": "running", "spec": {}}')
        for extra in (("--name", "twin"), ()):
            code, out, err = finish(search(tmp_path, spec, *extra), timeout=120)
            assert code == 2, err[-3000:]
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and "another search is writing experiment 'twin'" in lines[0], err[-3000:]
            assert f"pid {os.getpid()}" in lines[0] and "Traceback" not in err
        resumed = subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--resume", "twin", "--results-dir",
                                  str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 2 and "another search is writing experiment 'twin'" in resumed.stderr
    assert not (exp / "tune").exists()  # refused before anything ran
    # once the holder has gone, the lock is free (flock dies with its holder however it ends)
    from hamtune.search.lock import busy

    assert busy(exp) is None
