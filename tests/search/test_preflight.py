"""The pretrained-weights preflight of a local search: one line and exit 2 before Ray or any trial starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hamtune.errors import HamtuneError
from hamtune.search.preflight import check_on_driver, weight_requests


def spec(tmp_path: Path, model: dict, space: dict | None = None) -> Path:
    raw = {
        "experiment": "weights",
        "data": {"source": "synthetic", "synthetic_size": 200, "image_size": 16, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "resnet10t", "head_hidden": 16, **model},
        "train": {"epochs": 1, "batch_size": 32},
        "search": {"num_samples": 2, "max_concurrent": 1, "grace_period": 1},
        "resources": {"cpu": 1},
        "space": space or {"lr": {"loguniform": [1e-3, 1e-2]}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def empty_caches(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TORCH_HOME", "XDG_CACHE_HOME")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "RAY_USAGE_STATS_ENABLED": "0"}


def search(tmp_path: Path, spec_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--space", str(spec_path), "--results-dir",
                           str(tmp_path / "results")], env=empty_caches(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("model", "space", "expected"), [
    ({"pretrained": True}, None, "hamtune: error: pretrained: true needs resnet10t's ImageNet weights in a local "
                                 "cache"),
    ({"pretrained": False}, {"pretrained": {"choice": [False, "/no/such/weights.pth"]}},
     "hamtune: error: pretrained: weights file '/no/such/weights.pth' does not exist"),
])
def test_missing_weights_exit_2_with_one_line_before_ray_or_any_trial(tmp_path, model, space, expected):
    done = search(tmp_path, spec(tmp_path, model, space))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr[-3000:]
    assert not (tmp_path / "results").exists()  # no experiment record, no Tune folder, no trial folder
    assert not (tmp_path / "cache").exists()  # refused before the data was even prepared


def test_weight_requests_cover_fixed_and_searched_values():
    assert weight_requests({"model": "resnet10t", "pretrained": False}, {}) == []
    assert weight_requests({"model": "resnet10t", "pretrained": True}, {"lr": {"uniform": [0, 1]}}) == \
        [("resnet10t", True)]
    searched = weight_requests({"pretrained": True}, {"model": {"choice": ["resnet10t", "resnet18"]},
                                                      "pretrained": {"choice": [False, True, "/w.pth"]}})
    assert searched == [("resnet10t", True), ("resnet10t", "/w.pth"), ("resnet18", True), ("resnet18", "/w.pth")]
    assert weight_requests({}, {}) == []  # the defaults: resnet10t, pretrained false


def test_an_existing_weights_file_passes(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # the preflight checks presence; reading it is the trial's job
    check_on_driver({"pretrained": str(weights)}, {})
    with pytest.raises(HamtuneError, match="does not exist"):
        check_on_driver({"pretrained": str(tmp_path / "other.pth")}, {})
    monkeypatch.chdir(tmp_path)  # the file is there, but a trial runs in its own folder: refused whatever the driver sees
    with pytest.raises(HamtuneError, match="'w.pth' is a relative path; trials run in other folders"):
        check_on_driver({"pretrained": "w.pth"}, {})
