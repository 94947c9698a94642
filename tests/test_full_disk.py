"""A full disk, for real: `prepare`, `predict` and `evaluate` writing to a 20 MB tmpfs that is full (or nearly) end
in one line naming the path, exit code 2, and leave no partial file where a complete one was expected (no temp
files, no cache entry that looks complete, an older result file untouched).

Mounting a tmpfs needs root (CAP_SYS_ADMIN); elsewhere the tests are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from hamtune.cli import main
from hamtune.data.cache import open_entry

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
NO_SPACE = "cannot write: no space left on the device"


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A 20 MB tmpfs mounted for this module (skipped where mounting is not allowed); unmounted at the end."""
    where = tmp_path_factory.mktemp("tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(where)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(disk: Path, leave_pages: int) -> None:
    """Empty the disk, then reserve all of it but `leave_pages` pages in one filler file."""
    for path in disk.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        if free - leave_pages * PAGE > 0:
            os.posix_fallocate(f.fileno(), 0, free - leave_pages * PAGE)


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders (atomic writers' .*.tmp, cache builds' .tmp-*) anywhere under folder."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def one_error_line(err: str, under: Path) -> str:
    """The one line on stderr (tqdm's progress bar, drawn with carriage returns, aside)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "img/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("hamtune: error: ") and "Traceback" not in err, err
    assert str(under) in lines[0] and NO_SPACE in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from model_fixtures import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("disk-model") / "model.pt")


def test_prepare_on_a_disk_filling_up_fails_in_one_line_or_succeeds_whole(disk, sample_dir, capsys):
    """The sample at 16 px (a 108 kB array, a few small tables) into a cache on a disk with 0 to 64 free pages: each
    run either succeeds with an intact entry or ends in one line naming the file on that disk that did not fit,
    leaving no temp folder and no entry unless a whole one (the split file, written after the entry is complete, may
    be what did not fit); the runs fail at different files (the array, each table, the manifest, the split), and
    enough room succeeds."""
    outcomes = {}
    for pages in (0, 1, 8, *range(24, 41), 48, 64):  # every page where the files start to fit
        fill(disk, pages)
        cache = disk / "cache"
        code = main(["data", "prepare", "--source", str(sample_dir), "--image-size", "16", "--cache-dir", str(cache),
                     "--workers", "1"])
        out, err = capsys.readouterr()
        entries = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.is_dir() else []
        assert not leftovers(disk), (pages, leftovers(disk))
        if code == 0:
            assert len(entries) == 1 and open_entry(entries[0], 16) is not None, pages
            outcomes[pages] = "ok"
        else:
            assert code == 2 and out == "", (pages, out)
            line = one_error_line(err, disk)
            failed = Path(line.removeprefix("hamtune: error: ").split(": cannot write")[0])
            for entry in entries:  # only ever a complete one, without the file that did not fit
                assert open_entry(entry, 16) is not None and not (entry / failed.name).exists(), (pages, line)
            outcomes[pages] = failed.name
    assert outcomes[0] != "ok" and outcomes[64] == "ok", outcomes
    failures = {v for v in outcomes.values() if v != "ok"}
    assert {"table.parquet", "manifest.json"} <= failures and len(failures) >= 4, outcomes


def test_predict_out_on_a_full_disk_keeps_the_older_file(disk, model_file, sample_dir, tmp_path):
    """The real CLI: --out on a full disk is one line and exit 2; the previous predictions file stays whole."""
    fill(disk, 64)
    image = next((sample_dir / "HAM10000_images_part_1").glob("*.jpg"))
    out = disk / "predictions.csv"
    before = subprocess.run([sys.executable, "-m", "hamtune.cli", "predict", "--model", str(model_file), str(image),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert before.returncode == 0, before.stderr
    old = out.read_bytes()
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with open(filler, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, filler.stat().st_size + stat.f_bavail * stat.f_frsize)
    done = subprocess.run([sys.executable, "-m", "hamtune.cli", "predict", "--model", str(model_file), str(image),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2 and done.stdout == ""
    one_error_line(done.stderr, out)
    assert out.read_bytes() == old and not leftovers(disk)


def test_predict_with_its_workspace_on_a_full_disk(disk, model_file, sample_dir, monkeypatch, capsys):
    """The decoded images go to a temp folder first (TMPDIR): on a full disk that is one line naming the array,
    claimed up front (not SIGBUS in a worker writing through a memory map), and the temp folder is removed."""
    fill(disk, 0)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    images = sorted((sample_dir / "HAM10000_images_part_2").glob("*.jpg"))[:5]
    code = main(["predict", "--model", str(model_file), *map(str, images)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "decoded.npy" in one_error_line(err, disk)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_evaluate_on_a_full_disk_leaves_only_whole_files(disk, model_file, sample_dir, tmp_path, capsys):
    """The real CLI with its report folder on a disk with room for a few files: one line naming the file that did
    not fit, exit 2, and every file that was written reads back whole."""
    labels = tmp_path / "labels.csv"
    pd.read_csv(sample_dir / "HAM10000_metadata.csv").head(40).to_csv(labels, index=False)
    for pages in (0, 6):
        fill(disk, pages)
        report = disk / "eval"
        done = subprocess.run([sys.executable, "-m", "hamtune.cli", "evaluate", "--model", str(model_file),
                               "--images", str(sample_dir), "--labels", str(labels), "--out", str(report)],
                              cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 2, (pages, done.stderr)
        error = [line for line in done.stderr.splitlines() if line.startswith("hamtune: error: ")]
        assert len(error) == 1 and str(report) in error[0] and NO_SPACE in error[0], done.stderr
        assert "Traceback" not in done.stderr
        assert not leftovers(disk), leftovers(disk)
        for path in report.rglob("*") if report.is_dir() else []:
            if path.suffix == ".csv":
                pd.read_csv(path)
            elif path.suffix == ".png":
                with Image.open(path) as picture:
                    picture.load()
