"""The decode-once cache: reuse, invalidation, atomic entries, synthetic source caching, PreparedData accessors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hamtune.data import PreparedData, SplitSpec, default_cache_dir, encode_meta, prepare
from hamtune.vocab import META_DIM
from hamtune.errors import HamtuneError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sample_copy(sample_dir, tmp_path) -> Path:
    """A writable copy of the real sample (so tests may touch and edit files)."""
    return Path(shutil.copytree(sample_dir, tmp_path / "sample", copy_function=shutil.copy2))


def test_second_prepare_decodes_nothing(sample_copy, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(sample_copy, 16, cache_dir=cache, progress=False)
    second = prepare(sample_copy, 16, cache_dir=cache, progress=False)
    assert first.decoded == 140 and second.decoded == 0
    assert second.fingerprint == first.fingerprint and second.path == first.path == cache / first.fingerprint
    assert np.array_equal(first.images, second.images)
    pd.testing.assert_frame_equal(first.table, second.table)
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    assert sorted(p.name for p in first.path.iterdir()) == [
        "images.npy", "manifest.json", "problems.csv", "split-v0.15-t0.15-s0.parquet", "table.parquet"]
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["images"] == 140 and manifest["image_size"] == 16 and manifest["fingerprint"] == first.fingerprint


def test_changes_make_a_new_entry(sample_copy, tmp_path):
    cache = tmp_path / "cache"
    base = prepare(sample_copy, 16, cache_dir=cache, progress=False)

    other_size = prepare(sample_copy, 24, cache_dir=cache, progress=False)
    assert other_size.fingerprint != base.fingerprint and other_size.decoded == 140

    image = next((sample_copy / "HAM10000_images_part_2").glob("*.jpg"))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = prepare(sample_copy, 16, cache_dir=cache, progress=False)
    assert touched.fingerprint != base.fingerprint and touched.decoded == 140

    metadata = sample_copy / "HAM10000_metadata.csv"
    metadata.write_text(metadata.read_text().replace("80.0,male", "85.0,male", 1))
    edited = prepare(sample_copy, 16, cache_dir=cache, progress=False)
    assert edited.fingerprint not in (base.fingerprint, touched.fingerprint) and edited.decoded == 140
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        d.fingerprint for d in (base, other_size, touched, edited))


def test_entry_without_manifest_is_redone(sample_copy, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(sample_copy, 16, cache_dir=cache, progress=False)
    (first.path / "manifest.json").unlink()
    np.lib.format.open_memmap(first.path / "images.npy", mode="r+")[:] = 0  # a half-written array
    again = prepare(sample_copy, 16, cache_dir=cache, progress=False)
    assert again.decoded == 140 and again.path == first.path and (again.path / "manifest.json").is_file()
    assert again.images.std() > 10


def test_killed_prepare_leaves_no_complete_looking_entry(tiny_synthetic, tmp_path):
    """SIGKILL a real prepare while it decodes: no entry appears; the next prepare redoes it and clears the debris."""
    cache = tmp_path / "cache"
    script = (f"from hamtune.data import prepare; prepare({str(tiny_synthetic)!r}, 96, cache_dir={str(cache)!r}, "
              "workers=1, progress=False)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not any(cache.glob(".tmp-*/decoded.npy")) and time.monotonic() < deadline:
            assert process.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.005)
        time.sleep(0.2)  # let it write part of the array
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    leftovers = [p.name for p in cache.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-") and f"-{process.pid}" in leftovers[0]

    data = prepare(tiny_synthetic, 96, cache_dir=cache, progress=False, workers=1)
    assert data.decoded == len(data.table) > 0
    assert [p.name for p in cache.iterdir()] == [data.fingerprint]  # dead process's temp folder removed


def test_temp_folder_of_live_process_is_kept(sample_dir, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(sample_dir, 16, cache_dir=cache, progress=False)
    shutil.rmtree(first.path)
    parent_pid = os.getppid()  # alive for the whole test
    busy = cache / f".tmp-{first.fingerprint}-{socket.gethostname()}-{parent_pid}"
    busy.mkdir()
    prepare(sample_dir, 16, cache_dir=cache, progress=False)
    assert busy.is_dir()


def test_arrays_and_split_sizes(sample_dir, tmp_path):
    data = prepare(sample_dir, 16, cache_dir=tmp_path, progress=False)
    assert isinstance(data, PreparedData)
    train = data.arrays("train")
    evaluation = data.arrays("val", "test")
    everything = data.arrays()
    assert len(train) + len(evaluation) == len(everything) == 140
    assert (data.table["split"].iloc[train.index] == "train").all()
    assert np.array_equal(train.images, data.images[train.index]) and train.images.flags.writeable  # a copy
    assert np.array_equal(train.labels, data.table["label"].to_numpy()[train.index])
    assert train.meta.shape == (len(train), META_DIM)
    assert np.array_equal(evaluation.meta, encode_meta(data.table.iloc[evaluation.index]))
    assert np.all(np.diff(evaluation.index) > 0)  # table order
    sizes = data.split_sizes()
    assert sizes == {"train": {"images": 98, "lesions": 98}, "val": {"images": 21, "lesions": 21},
                     "test": {"images": 21, "lesions": 21}}
    with pytest.raises(HamtuneError, match="split 'holdout' is unknown"):
        data.arrays("holdout")


def test_split_choice_shares_the_decoded_entry(sample_dir, tmp_path):
    first = prepare(sample_dir, 16, cache_dir=tmp_path, progress=False)
    other = prepare(sample_dir, 16, cache_dir=tmp_path, progress=False, split=SplitSpec(0.2, 0.1, 5))
    assert other.decoded == 0 and other.path == first.path
    assert (first.path / "split-v0.2-t0.1-s5.parquet").is_file()
    assert other.split_sizes()["val"]["images"] == 28 and not first.table["split"].equals(other.table["split"])


def test_synthetic_source_is_generated_once(tmp_path):
    cache = tmp_path / "cache"
    first = prepare("synthetic", 16, cache_dir=cache, progress=False, synthetic_size=120, synthetic_seed=4)
    source = cache / "synthetic" / "n120-seed4"
    metadata_mtime = (source / "HAM10000_metadata.csv").stat().st_mtime_ns
    second = prepare("synthetic", 16, cache_dir=cache, progress=False, synthetic_size=120, synthetic_seed=4)
    assert first.decoded == 120 and second.decoded == 0 and second.fingerprint == first.fingerprint
    assert (source / "HAM10000_metadata.csv").stat().st_mtime_ns == metadata_mtime  # not regenerated
    assert len(first.table) == 120 and first.problems.empty
    other_seed = prepare("synthetic", 16, cache_dir=cache, progress=False, synthetic_size=120, synthetic_seed=5)
    assert other_seed.fingerprint != first.fingerprint
    # an unfinished generation (no completion marker) is redone
    (source / ".complete").unlink()
    again = prepare("synthetic", 16, cache_dir=cache, progress=False, synthetic_size=120, synthetic_seed=4)
    assert (source / ".complete").is_file() and again.decoded == 120


def test_parallel_decode_matches_serial(tiny_synthetic, tiny_synthetic_prepared, tmp_path):
    serial = prepare(tiny_synthetic, 16, cache_dir=tmp_path, progress=False, workers=1)
    assert serial.decoded == len(tiny_synthetic_prepared.table)  # the fixture decoded with 2 worker processes
    assert np.array_equal(serial.images, tiny_synthetic_prepared.images)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HAMTUNE_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("HAMTUNE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "hamtune"


@pytest.mark.parametrize("size", [0, 4, 2000, 32.5, True])
def test_rejects_bad_image_size(sample_dir, tmp_path, size):
    with pytest.raises(HamtuneError, match="image size"):
        prepare(sample_dir, size, cache_dir=tmp_path, progress=False)
