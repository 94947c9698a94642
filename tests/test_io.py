"""Folders swapped in whole: replace_folder and the clean-up of what killed processes left beside a folder."""

from __future__ import annotations

import socket
import subprocess
import sys

from hamtune.io import remove_abandoned_temps, replace_folder, temp_sibling


def dead_pid() -> int:
    """The pid of a process that has ended (what a killed writer leaves in its temp folder's name)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replace_folder_swaps_the_whole_folder_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "stale.txt").write_text("old run")
    tmp = temp_sibling(target)
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"new")
    replace_folder(tmp, target, ".complete", "done")
    assert sorted(p.name for p in target.iterdir()) == [".complete", "model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_finished_folder_killed_between_the_renames_is_moved_in_and_a_half_one_is_deleted(tmp_path):
    target = tmp_path / "best"
    host = socket.gethostname()
    finished = tmp_path / f".tmp-best-{host}-{dead_pid()}"  # marker written: the kill came after it
    finished.mkdir()
    (finished / "model.pt").write_bytes(b"new")
    (finished / ".complete").write_text("done")
    set_aside = tmp_path / f".old-best-{host}-{dead_pid()}"  # the old folder, renamed aside
    set_aside.mkdir()
    remove_abandoned_temps(target, ".complete")
    assert sorted(p.name for p in target.iterdir()) == [".complete", "model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    half = tmp_path / f".tmp-best-{host}-{dead_pid()}"  # no marker: a retrain killed mid-way
    half.mkdir()
    (half / "metrics.json").write_text("{")
    remove_abandoned_temps(target, ".complete")
    assert not half.exists() and (target / "model.pt").read_bytes() == b"new"
