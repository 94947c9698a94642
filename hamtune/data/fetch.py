"""One file over HTTP into a `.part` file that survives interruptions: resumed with Range (guarded by If-Range and the
server's ETag), retried with backoff, and given up on with one line that says how to continue."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hamtune.errors import HamtuneError
from hamtune.io import atomic_write_json, read_json

DEFAULT_RETRIES = 5
MAX_BACKOFF_S = 30.0
TIMEOUT_S = (30, 60)  # connect, read (seconds without a byte)
CHUNK = 1 << 16  # a read cut short by a dropped connection loses at most this much


def session():
    """An HTTP session that asks for the bytes as stored (byte offsets must mean the file's own)."""
    import requests

    from hamtune import __version__

    session = requests.Session()
    # identity: a compressed transfer would make byte offsets (Range) refer to something else than the file
    session.headers.update({"User-Agent": f"hamtune/{__version__}", "Accept-Encoding": "identity"})
    return session


class _Retry(Exception):
    """A failure worth another attempt (connection dropped, timeout, 5xx, short body)."""


def fetch(url: str, part: Path, *, session, retries: int = DEFAULT_RETRIES, progress: bool = True,
          desc: str = "") -> int:
    """Stream url into `part`, continuing from the bytes it already holds; return the bytes received by this call.

    Gives up after `retries` failed attempts (backoff 1, 2, 4, ... s, at most MAX_BACKOFF_S) with one line, keeping
    `part` for the next run.
    """
    import requests
    from tqdm import tqdm

    received, failures = 0, 0
    while True:
        have = part.stat().st_size if part.is_file() else 0
        headers = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            validator = read_json(sidecar(part)).get("validator")
            if validator:
                headers["If-Range"] = validator  # the server sends the whole file if it has changed since
        try:
            with session.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
                code = response.status_code
                if code == 416 and have:  # nothing after `have`: the part is complete, or longer than the file
                    total = _range_total(response.headers.get("Content-Range"))
                    if total == have:
                        return received
                    discard(part)
                    raise _Retry(f"the kept {part.name} ({have} bytes) is longer than the file ({total} bytes)")
                if 400 <= code < 500 and code not in (408, 429):
                    raise HamtuneError(f"{url}: HTTP {code} {response.reason}; expected the file at this address "
                                       "(check --base-url / $HAMTUNE_DATA_URL)")
                if code >= 400:
                    raise _Retry(f"HTTP {code} {response.reason}")
                if code == 206:
                    content_range = response.headers.get("Content-Range")
                    start, total = _range_start(content_range), _range_total(content_range)
                    if start != have:
                        discard(part)
                        raise _Retry(f"the server answered bytes from {start} instead of {have}")
                    mode = "ab"
                else:  # 200: the whole file (no Range support, or the file changed since the part was begun)
                    have, mode = 0, "wb"
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
                atomic_write_json(sidecar(part), {"url": url, "validator": validator, "total": total})
                with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                   unit_divisor=1024, desc=desc, disable=not progress,
                                                   file=sys.stderr, dynamic_ncols=True) as bar:
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                raise _Retry(f"the connection ended after {size} of {total} bytes")
            return received
        except (_Retry, requests.RequestException, ConnectionError, TimeoutError) as err:
            failures += 1
            if failures > retries:
                kept = part.stat().st_size if part.is_file() else 0
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise HamtuneError(
                    f"{url}: download failed after {failures} attempt(s) ({type(err).__name__}: {reason[:200]}); "
                    f"{kept:,} bytes kept in {part}: run the same command again to resume") from None
            time.sleep(min(MAX_BACKOFF_S, 2.0 ** (failures - 1)))
        except OSError as err:  # after the network errors: requests' exceptions are OSErrors too
            raise HamtuneError(f"{part}: cannot write the download ({err.strerror or err})") from None


def _range_start(content_range: str | None) -> int | None:
    try:  # "bytes 100-199/1000"
        return int(content_range.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _range_total(content_range: str | None) -> int | None:
    try:  # "bytes 100-199/1000" or "bytes */1000"
        return int(content_range.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def sidecar(part: Path) -> Path:
    return part.with_name(f"{part.name}.json")


def discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
