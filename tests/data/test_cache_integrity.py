"""A cache entry is checked when it is opened: a real prepared entry of the 140-image sample, damaged the ways a
crash, a full disk or a bad copy damage files, is rebuilt by the next `hamtune data prepare` (the real CLI) with one
warning line and no traceback, and the rebuilt entry holds the same pixels; the search's path (prepare_spec_data)
does the same; and an intact entry is reused without a warning.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hamtune.data import prepare, prepare_spec_data
from hamtune.data.cache import open_entry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(sample_dir, tmp_path_factory):
    """The sample prepared once at 16 px (PreparedData); tests damage copies of its cache folder."""
    return prepare(sample_dir, 16, cache_dir=tmp_path_factory.mktemp("pristine-cache"), progress=False, workers=1)


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def overwrite(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


DAMAGE = {  # name: (damage to the copied entry, words of the warning)
    "images.npy cut short": (lambda e: cut(e / "images.npy", (e / "images.npy").stat().st_size - 1000),
                             "a write cut short"),
    "images.npy empty": (lambda e: cut(e / "images.npy", 0), "no readable .npy header"),
    "images.npy header overwritten": (lambda e: overwrite(e / "images.npy", 0, b"\0" * 64), "no readable .npy header"),
    "images.npy header of another shape": (
        lambda e: overwrite(e / "images.npy", 0, (e / "images.npy").read_bytes()[:128].replace(b"(140,", b"(139,")),
        "holds uint8 (139, 16, 16, 3)"),
    "images.npy last pixels zeroed": (
        lambda e: overwrite(e / "images.npy", (e / "images.npy").stat().st_size - 4096, b"\0" * 4096),
        "images.npy does not match the checksum"),
    "table.parquet cut short": (lambda e: cut(e / "table.parquet", 100), "table.parquet does not match the checksum"),
    "problems.csv cut short": (lambda e: cut(e / "problems.csv", 5), "problems.csv does not match the checksum"),
    "manifest.json cut short": (lambda e: cut(e / "manifest.json", 40), "manifest.json is not valid JSON"),
}


def copy_entry(pristine, tmp_path: Path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(pristine.path.parent, cache)
    return cache, cache / pristine.fingerprint


def run_prepare(sample_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hamtune.cli", "data", "prepare", "--source", str(sample_dir),
                           "--image-size", "16", "--cache-dir", str(cache), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def message_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress bar (drawn with carriage returns)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "img/s" not in line
            and "decode 16px" not in line]


@pytest.mark.parametrize("name", list(DAMAGE))
def test_prepare_rebuilds_a_damaged_entry_with_one_warning(name, pristine, sample_dir, tmp_path):
    damage, words = DAMAGE[name]
    cache, entry = copy_entry(pristine, tmp_path)
    damage(entry)
    done = run_prepare(sample_dir, cache)
    assert done.returncode == 0, done.stderr
    lines = message_lines(done.stderr)
    assert len(lines) == 1 and "damaged cache entry" in lines[0] and str(entry) in lines[0], done.stderr
    assert words in lines[0] and "rebuilding it" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith(f"decoded 140 images at 16px -> {entry}")
    table, _ = open_entry(entry, 16)
    assert len(table) == 140
    rebuilt = np.load(entry / "images.npy", mmap_mode="r", allow_pickle=False)
    assert np.array_equal(rebuilt, pristine.images)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_a_damaged_split_file_is_recomputed_with_one_warning(pristine, sample_dir, tmp_path):
    """The split file is written after the manifest (per split spec), so it has no checksum: it must read back, and
    a cut-short one is recomputed (same lesions, same split) without decoding again."""
    cache, entry = copy_entry(pristine, tmp_path)
    split_file = entry / "split-v0.15-t0.15-s0.parquet"
    cut(split_file, split_file.stat().st_size // 2)
    done = run_prepare(sample_dir, cache)
    assert done.returncode == 0, done.stderr
    lines = message_lines(done.stderr)
    assert len(lines) == 1 and "damaged split file" in lines[0] and str(split_file) in lines[0], done.stderr
    assert done.stdout.startswith("reused 140 images")
    again = prepare(sample_dir, 16, cache_dir=cache, progress=False)
    assert list(again.table["split"]) == list(pristine.table["split"])


def test_an_intact_entry_is_reused_silently(pristine, sample_dir, tmp_path):
    """The checks pass on what prepare itself wrote: reused, nothing decoded, not a word on stderr."""
    cache, _ = copy_entry(pristine, tmp_path)
    done = run_prepare(sample_dir, cache)
    assert done.returncode == 0 and message_lines(done.stderr) == [], done.stderr
    assert done.stdout.startswith("reused 140 images")


def test_the_search_path_rebuilds_a_damaged_entry_too(pristine, sample_dir, tmp_path, caplog):
    """`hamtune search` (and the retrain) reach the cache through prepare_spec_data with the spec's data section."""
    from hamtune.search.spec import DataSettings

    cache, entry = copy_entry(pristine, tmp_path)
    cut(entry / "images.npy", 4096)
    settings = DataSettings(source=str(sample_dir), image_size=16, cache_dir=str(cache))
    with caplog.at_level("WARNING", logger="hamtune.data"):
        data = prepare_spec_data(settings, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "hamtune.data"]
    assert len(warnings) == 1 and "damaged cache entry" in warnings[0] and "\n" not in warnings[0]
    assert data.decoded == 140 and np.array_equal(data.images, pristine.images)


def test_an_entry_from_before_checksums_is_checked_by_its_header_and_size(pristine, sample_dir, tmp_path):
    """Entries written by an older hamtune have no checksums: still reused when whole, rebuilt when cut short."""
    cache, entry = copy_entry(pristine, tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["checksums"]
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert open_entry(entry, 16) is not None
    cut(entry / "images.npy", (entry / "images.npy").stat().st_size - 1)
    data = prepare(sample_dir, 16, cache_dir=cache, progress=False, workers=1)
    assert data.decoded == 140 and np.array_equal(data.images, pristine.images)
