"""Search-spec validation: every bad spec is one line naming the key, and exit code 2 from the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hamtune.errors import HamtuneError
from hamtune.search.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


def base_spec() -> dict:
    return yaml.safe_load((ROOT / "search_spaces/default.yaml").read_text())


def test_shipped_default_spec_is_valid_and_builds_tune_domains():
    from ray import tune

    spec = load_spec(ROOT / "search_spaces/default.yaml")
    assert spec.experiment == "default"
    assert spec.search.num_samples >= 8 and spec.search.scheduler == "asha"
    assert spec.train["model"] == "resnet10t" and spec.data.source == "synthetic"
    space = spec.tune_space()
    assert set(spec.searched_keys()) >= {"lr", "augment_strength", "imbalance"}
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert isinstance(space["imbalance"], tune.search.sample.Categorical)
    assert space["imbalance"].categories == ["none", "weighted_loss", "oversample", "focal"]


def test_overrides_replace_file_values():
    spec = spec_from_dict(base_spec(), overrides={"search.num_samples": 3, "train.epochs": 2, "experiment": "x1",
                                                   "search.max_concurrent": None})
    assert spec.search.num_samples == 3 and spec.max_epochs == 2 and spec.experiment == "x1"
    assert spec.search.max_concurrent == base_spec()["search"]["max_concurrent"]  # None = not given


def test_all_distribution_forms_accepted():
    raw = base_spec()
    raw["space"] = {"lr": {"loguniform": [1e-4, 1e-2]}, "augment_strength": {"quniform": [0, 1, 0.25]},
                    "head_hidden": {"randint": [32, 257]}, "batch_size": {"choice": [32, 64]},
                    "weight_decay": {"qloguniform": [1e-5, 1e-2, 1e-5]}, "label_smoothing": 0.1,
                    "head_dropout": {"uniform": [0.0, 0.5]}}
    spec = spec_from_dict(raw)
    space = spec.tune_space()
    assert space["label_smoothing"] == 0.1
    assert spec.searched_keys() == ["lr", "augment_strength", "head_hidden", "batch_size", "weight_decay", "head_dropout"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.update(bogus=1), "unknown key 'bogus'"),
    (lambda r: r["search"].update(num_sample=4), "unknown key 'search.num_sample'"),
    (lambda r: r["space"].update(learning_rate={"uniform": [0, 1]}), "unknown hyperparameter 'space.learning_rate'"),
    (lambda r: r["space"].update(lr={"loguniform": [1e-2, 1e-4]}), "low 0.01 >= high 0.0001"),
    (lambda r: r["space"].update(lr={"loguniform": [0, 1e-2]}), "positive bounds on a log scale"),
    (lambda r: r["space"].update(lr={"normal": [0, 1]}), "unknown distribution 'normal'"),
    (lambda r: r["space"].update(imbalance={"choice": ["none", "smote"]}), "space.imbalance allows 'smote'"),
    (lambda r: r["space"].update(imbalance={"choice": []}), "non-empty list"),
    (lambda r: r["space"].update(lr={"uniform": [0.1]}), "space.lr.uniform must be a list of numbers [low, high]"),
    (lambda r: r["space"].update(epochs={"randint": [1, 5]}), "'space.epochs' cannot be searched"),
    (lambda r: r["train"].update(optimiser="sgd"), "unknown training setting 'train.optimiser'"),
    (lambda r: r["search"].update(mode="maximise"), "search.mode = 'maximise'"),
    (lambda r: r["search"].update(metric="val_auc"), "search.metric = 'val_auc'"),
    (lambda r: r["search"].update(num_samples=0), "search.num_samples = 0"),
    (lambda r: r["search"].update(grace_period=99), "search.grace_period = 99"),
    (lambda r: r["search"].update(startup_trials=-1), "search.startup_trials = -1"),
    (lambda r: r["search"].update(multivariate="yes"), "search.multivariate = 'yes' has the wrong type"),
    (lambda r: r["search"].update(constant_liar=1), "search.constant_liar = 1 has the wrong type"),
    (lambda r: r["resources"].update(gpu=1.5), "resources.gpu = 1.5"),
    (lambda r: r["data"].update(image_size="big"), "data.image_size = 'big' has the wrong type"),
    (lambda r: r["data"].update(val=0.6, test=0.5), "val + test < 1"),
    (lambda r: r.update(experiment="../escape"), "experiment name '../escape'"),
    (lambda r: r.update(space=[1, 2]), "section 'space' must be a mapping"),
])
def test_invalid_specs_are_rejected_with_the_key(mutate, expected):
    raw = base_spec()
    mutate(raw)
    with pytest.raises(HamtuneError) as err:
        spec_from_dict(raw, source="spec.yaml")
    message = str(err.value)
    assert expected in message
    assert message.startswith("spec.yaml") and "\n" not in message


def test_cli_reports_bad_spec_in_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    raw = base_spec()
    raw["space"]["lr"] = {"loguniform": [-1, 1]}
    bad.write_text(yaml.safe_dump(raw))
    broken = tmp_path / "broken.yaml"
    broken.write_text("space: {lr: [1, 2\n")
    for path, expected in ((bad, "space.lr.loguniform needs positive bounds"), (broken, "is not valid YAML"),
                           (tmp_path / "missing.yaml", "search spec not found")):
        proc = subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--space", str(path),
                               "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hamtune: error: ") and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()  # rejected before anything ran


def test_recorded_spec_round_trips():
    # `search --resume` and `best` rebuild the spec from experiment.json's copy of it.
    spec = load_spec(ROOT / "search_spaces/default.yaml")
    again = spec_from_dict(spec.to_dict(), source="experiment.json")
    assert again.to_dict() == spec.to_dict()
    assert again.data.cache_dir is None


def test_tpe_settings_reach_optunas_sampler():
    from hamtune.search.searcher import make_searcher

    raw = base_spec()
    raw["search"].update(startup_trials=7, multivariate=False, constant_liar=False, num_samples=20)
    sampler = make_searcher(spec_from_dict(raw)).searcher._sampler
    assert (sampler._n_startup_trials, sampler._multivariate, sampler._constant_liar) == (7, False, False)
    raw["search"].update(num_samples=4)  # never more start-up trials than trials
    assert make_searcher(spec_from_dict(raw)).searcher._sampler._n_startup_trials == 4


def test_the_order_keys_are_written_in_does_not_change_the_search():
    """YAML tools sort keys, people do not: both orders of one space must give the same start-up trials (the
    quasi-random dimensions follow the space's key order)."""
    from hamtune.search.startup import start_up_points

    space = {"lr": {"loguniform": [1e-4, 1e-2]}, "augment_strength": {"uniform": [0, 1]},
             "weight_decay": {"loguniform": [1e-6, 1e-3]}, "imbalance": {"choice": ["none", "oversample"]}}
    written = spec_from_dict({"search": {"seed": 3, "num_samples": 6}, "space": space})
    reordered = spec_from_dict({"search": {"seed": 3, "num_samples": 6}, "space": dict(reversed(space.items()))})
    assert start_up_points(written) == start_up_points(reordered)
    assert list(written.tune_space()) == list(reordered.tune_space())  # TPE and random draw in this order
    assert len({p["lr"] for p in start_up_points(written)}) == 5  # spread, not one point repeated
