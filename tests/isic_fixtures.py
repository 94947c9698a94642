"""ISIC 2018 Task 3 files built from the real 140-image HAM10000 sample, and a real HTTP server that serves them.

The archives have the official names and inner layout (a top folder named like the archive, ATTRIBUTION.txt,
LICENSE.txt, one-hot ground truth, lesion groupings), so the downloader and the reader run exactly as on the real
data; only the counts are the sample's (140 per set).
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd

ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
SETS = {"isic2018-train": "Training", "isic2018-val": "Validation", "isic2018-test": "Test"}
CONFIRM_TYPES = {"histo": "histopathology", "follow_up": "serial imaging showing no change",
                 "consensus": "single image expert consensus",
                 "confocal": "confocal microscopy with consensus dermoscopy"}
MERGED_PER_CLASS = 2  # the first images of each class share one lesion id, so that lesion grouping matters


def sample_table(sample_dir: Path) -> pd.DataFrame:
    """The sample's metadata sorted by image_id, with each image's path."""
    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv", dtype=str)
    paths = {p.stem: p for p in sorted(sample_dir.rglob("*.jpg"))}
    meta["path"] = meta["image_id"].map(paths)
    return meta.sort_values("image_id").reset_index(drop=True)


def lesion_ids(table: pd.DataFrame) -> pd.Series:
    """The sample's lesion ids, except that the first MERGED_PER_CLASS images of each class share one."""
    lesions = table["lesion_id"].copy()
    for _, group in table.groupby("dx"):
        first = group.index[:MERGED_PER_CLASS]
        lesions[first] = lesions[first[0]]
    return lesions


def _zip(members: dict[str, bytes], *, stored: bool) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def ground_truth_csv(image_ids, dx) -> bytes:
    """One-hot rows sorted by image, as in the official files (the official scorer relies on that order: it sorts
    truth and predictions by image but not its weights, so an unsorted truth file gets its zero weight misplaced)."""
    rows = pd.DataFrame({"image": list(image_ids)})
    for column in ISIC_COLUMNS:
        rows[column] = [1.0 if d == column.lower() else 0.0 for d in dx]
    return rows.sort_values("image").to_csv(index=False).encode()


def isic_files(sample_dir: Path, *, drop_images: int = 0, renames: dict[str, str] | None = None) -> dict[str, bytes]:
    """Every file of the three sets by its official name. drop_images leaves that many images out of each input
    archive (a wrong count); renames gives test-set images other ids (e.g. the official zero-weight image)."""
    table = sample_table(sample_dir)
    files: dict[str, bytes] = {}
    notes = {"ATTRIBUTION.txt": b"test archive built from the HAM10000 sample\n", "LICENSE.txt": b"CC BY-NC 4.0\n"}
    for name, split in SETS.items():
        ids = table["image_id"].tolist()
        if name == "isic2018-test" and renames:
            ids = [renames.get(i, i) for i in ids]
        top = f"ISIC2018_Task3_{split}_Input"
        members = {f"{top}/{i}.jpg": Path(p).read_bytes() for i, p in zip(ids, table["path"])}
        for dropped in list(members)[:drop_images]:
            del members[dropped]
        members.update({f"{top}/{k}": v for k, v in notes.items()})
        files[f"{top}.zip"] = _zip(members, stored=True)
        truth = f"ISIC2018_Task3_{split}_GroundTruth"
        files[f"{truth}.zip"] = _zip({f"{truth}/{truth}.csv": ground_truth_csv(ids, table["dx"]),
                                      **{f"{truth}/{k}": v for k, v in notes.items()}}, stored=False)
    groupings = pd.DataFrame({"image": table["image_id"], "lesion_id": lesion_ids(table),
                              "diagnosis_confirm_type": table["dx_type"].map(CONFIRM_TYPES)})
    files["ISIC2018_Task3_Training_LesionGroupings.csv"] = groupings.to_csv(index=False).encode()
    return files


def corrupt_member(archive: bytes, member_index: int = 3) -> bytes:
    """The archive with one byte flipped inside a member's (stored) data: the central directory still reads, the
    member's CRC does not match."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        info = z.infolist()[member_index]
    header = archive[info.header_offset:info.header_offset + 30]
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    data = bytearray(archive)
    data[at] ^= 0xFF
    return bytes(data)


def extract_layout(files: dict[str, bytes], name: str, out: Path, *, lesions: bool = True) -> Path:
    """A set unpacked by hand (what the downloader produces, without it); returns out."""
    split = SETS[name]
    for file_name, data in files.items():
        if f"_{split}_" not in file_name:
            continue
        if file_name.endswith(".zip"):
            zipfile.ZipFile(io.BytesIO(data)).extractall(out)
        elif lesions:
            (out / file_name).write_bytes(data)
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 20  # a stuck client cannot hold a server thread for longer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        server = self.server
        name = self.path.split("?")[0]
        if not name.startswith(server.prefix) or name[len(server.prefix):] not in server.files:
            self.send_error(404)
            return
        name = name[len(server.prefix):]
        data = server.files[name]
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        rng = self.headers.get("Range")
        with server.lock:
            server.requests.append((name, rng))
            drop_after = server.drop_once.pop(name, None)
        start = 0
        if rng and self.headers.get("If-Range", etag) == etag:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if drop_after is not None:  # the connection breaks mid-file, once
            self.wfile.write(body[:drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
        with server.lock:
            server.bytes_sent += len(body)


@contextmanager
def serve(files: dict[str, bytes], prefix: str = "/2018/"):
    """An HTTP server on 127.0.0.1 (a free port) serving `files` under prefix; yields it (base_url, requests,
    drop_once, files can be read and changed while it runs)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files, server.prefix = dict(files), prefix
    server.requests, server.drop_once, server.bytes_sent = [], {}, 0
    server.lock = threading.Lock()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}{prefix}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
