"""What a search paid and learned, on one tiny real search: savings from the tables, fANOVA importance, warm start,
TensorBoard events, and the new flags' bad values."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hamtune.search import tables as res
from hamtune.io import atomic_write_table

pytestmark = pytest.mark.slow
SEARCHED = ["lr", "augment_strength", "imbalance"]


def tiny_spec(cache_dir: Path, **search) -> dict:
    return {
        "experiment": "tiny",
        "data": {"source": "synthetic", "synthetic_size": 400, "image_size": 16, "cache_dir": str(cache_dir)},
        "model": {"name": "resnet10t", "head_hidden": 32, "head_dropout": 0.1},
        "train": {"epochs": 3, "batch_size": 32, "warmup_epochs": 0.5},
        "search": {"num_samples": 6, "max_concurrent": 1, "grace_period": 1, "reduction_factor": 2, "seed": 3,
                   **search},
        "resources": {"cpu": 1},
        "space": {"lr": {"loguniform": [1e-4, 3e-2]}, "augment_strength": {"uniform": [0, 1]},
                  "imbalance": {"choice": ["none", "weighted_loss", "oversample", "focal"]}},
    }


def hamtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hamtune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_local):
    """One tiny real search (ASHA stops some trials), shared by every test here."""
    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    tmp = tmp_path_factory.mktemp("payoff")
    spec = spec_from_dict(tiny_spec(tmp / "cache"), source="tiny.yaml")
    run_search(spec, results_dir=tmp / "results", verbose=0)
    return tmp


def test_savings_equal_what_the_tables_say(searched):
    from hamtune.search.savings import compute_payoff

    exp = searched / "results" / "tiny"
    trials, history = res.load_tables(exp)
    record = res.read_experiment(exp)
    # Independently: one history row per epoch a trial ran; every trial to train.epochs is the full cost.
    spent = len(history.drop_duplicates(["trial_id", "epoch"]))
    full = len(trials) * int(record["spec"]["train"]["epochs"])
    last_epoch = history.groupby("trial_id")["epoch"].max()
    stopped_ids = trials.loc[trials["status"] == "stopped", "trial_id"]
    cut = last_epoch[stopped_ids].value_counts().sort_index()
    assert len(stopped_ids) > 0, "ASHA stopped nothing: the savings would be trivially zero"

    p = compute_payoff(trials, history, record)
    assert (p.trial_epochs, p.full_trial_epochs) == (spent, full)
    assert p.cut_at == {int(e): int(n) for e, n in cut.items()}
    assert p.by_status == trials["status"].value_counts().to_dict()
    assert record["payoff"]["trial_epochs"] == spent and record["payoff"]["full_trial_epochs"] == full

    out = hamtune("results", "tiny", "--results-dir", str(searched / "results"))
    assert out.returncode == 0, out.stderr
    assert f"trial-epochs: {spent} spent of {full}" in out.stdout
    assert f"({1 - spent / full:.0%} saved)" in out.stdout
    for epoch, n in cut.items():
        assert f"epoch {epoch} ({n} trial" in out.stdout
    counts = re.search(r"trials: (\d+) \((.*)\)", out.stdout)
    assert int(counts.group(1)) == len(trials)
    assert f"{len(stopped_ids)} stopped early by ASHA" in counts.group(2)


def test_importance_names_every_searched_hyperparameter(searched):
    exp = searched / "results" / "tiny"
    out = hamtune("results", "tiny", "--importance", "--results-dir", str(searched / "results"))
    assert out.returncode == 0, out.stderr
    section = out.stdout.split("importance of each hyperparameter", 1)[1]
    shares = dict(re.findall(r"^\s+(\w+)\s+([0-9.]+)$", section, flags=re.M))
    assert sorted(shares) == sorted(SEARCHED)
    assert sum(float(v) for v in shares.values()) == pytest.approx(1.0, abs=0.01)
    assert (exp / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importance_with_too_few_finished_trials_says_so(searched, tmp_path):
    few = tmp_path / "results" / "few"
    shutil.copytree(searched / "results" / "tiny", few, ignore=shutil.ignore_patterns("tune", "importance.png"))
    trials, _ = res.load_tables(few)
    atomic_write_table(trials.head(2), few / "trials.parquet")
    out = hamtune("results", "few", "--importance", "--results-dir", str(tmp_path / "results"))
    assert out.returncode == 0, out.stderr
    assert "importance: too few finished trials (2 ran to their end" in out.stdout
    assert not (few / "importance.png").exists()


def test_warm_start_hands_the_earlier_results_to_the_searcher(searched):
    from ray.tune.search.optuna import OptunaSearch

    from hamtune.search.driver import run_search
    from hamtune.search.spec import spec_from_dict

    earlier = searched / "results" / "tiny"
    old, old_history = res.load_tables(earlier)
    spec = spec_from_dict(tiny_spec(searched / "cache", num_samples=2), source="warm.yaml")
    spec.experiment = "warm"
    run_search(spec, results_dir=searched / "results", verbose=0, warm_start=earlier)

    record = res.read_experiment(searched / "results" / "warm")
    ended = old[old["status"].isin(["completed", "stopped"])]
    assert record["warm_start"]["experiment"] == "tiny" and record["warm_start"]["trials"] == len(ended)
    state_file = sorted((searched / "results" / "warm" / "tune").glob("searcher-state-*.pkl"))[-1]
    searcher = OptunaSearch()
    searcher.restore(str(state_file))  # the searcher as Tune saved it
    study_trials = searcher._ot_study.trials
    assert len(study_trials) == len(ended) + 2  # the earlier trials first, then this search's own
    for got, (_, want) in zip(study_trials, ended.iterrows()):
        assert got.params["imbalance"] == want["config.imbalance"]
        assert got.params["lr"] == pytest.approx(want["config.lr"])
        assert got.state.name == ("PRUNED" if want["status"] == "stopped" else "COMPLETE")
        curve = old_history[old_history["trial_id"] == want["trial_id"]].sort_values("epoch")
        assert list(got.intermediate_values.values()) == pytest.approx(list(curve["val_balanced_accuracy"]))
        if want["status"] == "completed":
            assert got.value == pytest.approx(want["last_val_balanced_accuracy"])


def test_tensorboard_events_are_written_per_trial(searched):
    trials, _ = res.load_tables(searched / "results" / "tiny")
    events = sorted((searched / "results" / "tiny" / "tune").glob("*/events.out.tfevents.*"))
    assert len(events) == len(trials)
    assert all(b"ray/tune/val_balanced_accuracy" in e.read_bytes() for e in events)


def test_bad_values_for_the_new_flags_are_one_line_and_exit_2(searched, tmp_path):
    results_dir = str(searched / "results")
    narrow = tiny_spec(searched / "cache")
    narrow["space"]["lr"] = {"loguniform": [1e-6, 1e-5]}
    narrow_path = tmp_path / "narrow.yaml"
    narrow_path.write_text(yaml.safe_dump(narrow))
    rnd = tiny_spec(searched / "cache", searcher="random")
    rnd_path = tmp_path / "random.yaml"
    rnd_path.write_text(yaml.safe_dump(rnd))
    cases = [
        (["search", "--space", str(narrow_path), "--warm-start", "tiny"], "lr="),
        (["search", "--space", str(narrow_path), "--warm-start", "nope"], "no experiment named 'nope'"),
        (["search", "--space", str(rnd_path), "--warm-start", "tiny"], "needs search.searcher: optuna"),
        (["search", "--resume", "tiny", "--warm-start", "tiny"], "--warm-start starts a new search"),
        (["results", "--importance"], "--importance needs an experiment"),
    ]
    for argv, expected in cases:
        out = hamtune(*argv, "--results-dir", results_dir)
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hamtune: error:") and expected in lines[0], (argv, lines)
        assert "np.float64" not in lines[0]
    assert not (searched / "results" / "tiny-2").exists()  # refused before the new experiment was created
