"""One search at a time per experiment: a lock on the experiment's folder, held while a search writes it.

Two searches of the same name would write the same tables and Tune state and both say "finished" with half the
trials; the second one is refused in one line instead. An advisory lock (flock) is released by the kernel when its
holder exits, however it exits, so a killed search never leaves its experiment locked.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hamtune.errors import HamtuneError
from hamtune.io import now_iso

LOCK_FILE = ".search.lock"


@contextmanager
def experiment_lock(exp_dir: Path) -> Iterator[None]:
    """Hold the experiment's lock for the `with` block; HamtuneError naming the holder when another search has it."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refuse_if_busy(exp_dir)
            raise HamtuneError(f"{exp_dir}: another search is writing experiment '{exp_dir.name}'") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": now_iso()}).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def busy(exp_dir: Path) -> dict | None:
    """The holder ({"pid", "since"}) when another search holds the experiment's lock now, else None."""
    path = exp_dir / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {"pid": "?", "since": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refuse_if_busy(exp_dir: Path) -> None:
    holder = busy(exp_dir)
    if holder is not None:
        raise HamtuneError(f"{exp_dir}: another search is writing experiment '{exp_dir.name}' (pid "
                           f"{holder.get('pid', '?')}, since {holder.get('since', '?')}); wait for it to end, or "
                           "give this search another --name")
