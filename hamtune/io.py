"""Writing what a user keeps: every file hamtune produces goes through here, atomically (temp file + rename).

A reader (a person, `hamtune results`, a resumed search) never sees half a file, and a crash mid-write leaves the
previous version in place. One JSON converter (json_ready) serves every JSON file, so numpy scalars, paths and NaN
are written the same way everywhere. A write that the disk refuses (full, over quota, read-only, not permitted) removes
its temp file and ends in one HamtuneError naming the path (unwritable), never a traceback or a partial file.
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hamtune.errors import HamtuneError

# What the disk, not hamtune, refuses: said in one line with the path instead of a traceback.
_REFUSALS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system", errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
}


def unwritable(path: str | os.PathLike, exc: OSError) -> BaseException:
    """The one-line HamtuneError for an OSError by which the disk refused a write to `path` (full, over quota,
    read-only, not permitted); any other OSError is returned as it is. Use: `raise unwritable(path, exc) from None`."""
    reason = _REFUSALS.get(getattr(exc, "errno", None))
    if reason is None:
        return exc
    hint = "; free some space there or choose another folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return HamtuneError(f"{os.fspath(path)}: cannot write: {reason}{hint}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file. A refused write
    (unwritable) leaves neither the temp file nor a partial `path`, and the previous `path`, if any, in place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise unwritable(path, exc) from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain(value: Any) -> Any:
    """A numpy scalar (from numpy or a parquet table) as the Python value, so messages never show np.float64(...)."""
    return value.item() if isinstance(value, np.generic) else value


def json_ready(value: Any) -> Any:
    """NaN/inf -> None, numpy -> Python, tuples -> lists, paths -> str: strict JSON, and plain data that
    torch.load(weights_only=True) accepts in a model file."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    value = plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        return str(value)  # also str subclasses such as torch's TorchVersion, which weights_only loading refuses
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n").encode())


def write_csv(path: str | os.PathLike, table) -> Path:
    return atomic_write_bytes(path, table.to_csv(index=False).encode())


def atomic_write_table(table, path_parquet: str | os.PathLike) -> Path:
    """A pandas table as parquet and a CSV copy beside it, each atomically."""
    path_parquet = Path(path_parquet)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path_parquet, buf.getvalue())
    write_csv(path_parquet.with_suffix(".csv"), table)
    return path_parquet


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110, tight: bool = False) -> Path:
    """A matplotlib figure as a PNG, written atomically like every other result file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return atomic_write_bytes(path, buf.getvalue())


def replace_folder(tmp: Path, target: Path, marker: str, marker_text: str) -> None:
    """Move a finished temp folder into place: its completion marker written last, an older or unfinished `target`
    renamed aside first and deleted only once the new one is in place. Readers trust a folder only with its marker,
    so none ever reads half of one; a kill between the two renames leaves the finished temp folder, which
    remove_abandoned_temps moves into place rather than deleting."""
    tmp, target = Path(tmp), Path(target)
    atomic_write_bytes(tmp / marker, marker_text.encode())
    old = target.with_name(f".old-{target.name}-{socket.gethostname()}-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file, or {} when the file is missing, unreadable or not an object (callers treat those
    alike: not written yet, or written by a crash)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def now_iso() -> str:
    """The one clock of every file hamtune writes: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def temp_sibling(target: Path) -> Path:
    """Where a folder for `target` is built before it is renamed into place: beside it (same filesystem, so the
    rename is atomic), named after this host and process so remove_abandoned_temps can tell whose it is."""
    target = Path(target)
    return target.with_name(f".tmp-{target.name}-{socket.gethostname()}-{os.getpid()}")


def remove_abandoned_temps(target: Path, marker: str | None = None) -> None:
    """Delete temp_sibling folders of `target` (and folders replace_folder set aside) left by killed processes on
    this host (their pid no longer runs). With `marker`: when `target` itself is missing, a dead process's finished
    temp folder (it holds the marker: killed between replace_folder's two renames) is moved into place instead."""
    target = Path(target)
    host = socket.gethostname()
    for kind in (".tmp", ".old"):
        prefix = f"{kind}-{target.name}-{host}-"
        for path in sorted(target.parent.glob(f"{prefix}*")):
            pid = path.name[len(prefix):]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                if kind == ".tmp" and marker and not target.exists() and (path / marker).is_file():
                    os.rename(path, target)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            except PermissionError:  # alive, someone else's
                pass