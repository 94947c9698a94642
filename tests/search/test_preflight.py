"""The pretrained weights of a search, read once on the driver: missing ones are one line and exit 2 before Ray or
any trial starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hamtune.errors import HamtuneError
from hamtune.search.preflight import read_requested_weights, weight_requests, weights_key


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
            "HAMTUNE_WEIGHTS_DIR": str(tmp_path / "store"), "RAY_USAGE_STATS_ENABLED": "0"}


def search(tmp_path: Path, spec_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hamtune.cli", "search", "--space", str(spec_path), "--results-dir",
                           str(tmp_path / "results")], env=empty_caches(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("model", "space", "expected"), [
    ({"pretrained": True}, None, "hamtune: error: pretrained: true needs resnet10t's ImageNet weights, and none are "
                                 "installed"),
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


def test_every_requested_file_is_read_once_and_a_bad_one_refused(tmp_path, monkeypatch):
    import timm
    import torch

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    read = read_requested_weights({"pretrained": str(weights)}, {"model": {"choice": ["resnet10t", "resnet18"]}})
    assert sorted(read) == [weights_key("resnet10t", str(weights)), weights_key("resnet18", str(weights))]
    assert torch.equal(read[weights_key("resnet10t", str(weights))]["conv1.0.weight"],
                       torch.load(weights, weights_only=True)["conv1.0.weight"])
    assert read_requested_weights({"pretrained": False}, {}) == {}
    with pytest.raises(HamtuneError, match="does not exist"):
        read_requested_weights({"pretrained": str(tmp_path / "other.pth")}, {})
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(HamtuneError, match="cannot read weights file"):
        read_requested_weights({"pretrained": str(empty)}, {})
    monkeypatch.chdir(tmp_path)  # the file is there, but a relative path means another file where trials run
    with pytest.raises(HamtuneError, match="'w.pth' is a relative path"):
        read_requested_weights({"pretrained": "w.pth"}, {})
