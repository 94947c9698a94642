"""`hamtune data download`: the ISIC 2018 Task 3 data (HAM10000 and the official validation and test sets) in one
command, checked before anything reads it.

What makes it safe to interrupt and to rerun:
- each file streams into `downloads/<name>.part` and continues from there (HTTP Range, guarded by If-Range with the
  server's ETag) after a dropped connection, in the same run (retries with backoff) or the next one;
- a finished file is checked before it is kept: the zip's own CRCs (zipfile.testzip), the expected number of images,
  the CSV header and row count; a file that fails is deleted, so the next run fetches it afresh;
- each file's SHA-256 is recorded in `manifest.json` at its first download and compared on every later run, so a
  changed mirror or a damaged disk is noticed instead of silently giving other data;
- archives are extracted into a temporary folder that is renamed into place with a `.complete` marker written last,
  so a half-extracted set is never read; a set whose marker matches the manifest is not downloaded again.

Layout under the destination ($HAMTUNE_DATA_DIR or ~/.cache/hamtune/data):
    manifest.json  downloads/<archives>  isic2018-train/  isic2018-val/  isic2018-test/
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from hamtune.data import isic2018
from hamtune.data.images import IMAGE_SUFFIXES
from hamtune.errors import HamtuneError
from hamtune.data.fetch import DEFAULT_RETRIES, discard, fetch, session, sidecar
from hamtune.io import atomic_write_json, now_iso, read_json, remove_abandoned_temps, replace_folder, temp_sibling

DEFAULT_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2018/"
MANIFEST = "manifest.json"
DOWNLOADS = "downloads"
COMPLETE = ".complete"

LICENCE = """\
Data licence: ISIC 2018 challenge data, CC BY-NC 4.0 (https://creativecommons.org/licenses/by-nc/4.0/);
the training images are HAM10000, CC BY-NC-SA 4.0 (https://creativecommons.org/licenses/by-nc-sa/4.0/).
Non-commercial use only; see ATTRIBUTION.txt and LICENSE.txt in each extracted folder. Please cite:
  Codella N. et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the International
  Skin Imaging Collaboration (ISIC). arXiv:1902.03368 (2019).
  Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source dermatoscopic
  images of common pigmented skin lesions. Sci. Data 5, 180161 (2018). doi:10.1038/sdata.2018.161"""

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file on the server and how to check it: 'images' (zip of JPEGs), 'ground_truth' (zip holding the one-hot
    CSV), 'lesions' (the lesion-groupings CSV)."""

    name: str
    kind: str


@dataclass(frozen=True)
class Dataset:
    name: str
    images: int  # images in the input archive = rows of the ground truth (and of the lesion file)
    files: tuple[RemoteFile, ...]


DATASETS = {
    "isic2018-train": Dataset("isic2018-train", 10_015, (
        RemoteFile("ISIC2018_Task3_Training_Input.zip", "images"),
        RemoteFile("ISIC2018_Task3_Training_GroundTruth.zip", "ground_truth"),
        RemoteFile("ISIC2018_Task3_Training_LesionGroupings.csv", "lesions"))),
    "isic2018-val": Dataset("isic2018-val", 193, (
        RemoteFile("ISIC2018_Task3_Validation_Input.zip", "images"),
        RemoteFile("ISIC2018_Task3_Validation_GroundTruth.zip", "ground_truth"))),
    "isic2018-test": Dataset("isic2018-test", 1_512, (
        RemoteFile("ISIC2018_Task3_Test_Input.zip", "images"),
        RemoteFile("ISIC2018_Task3_Test_GroundTruth.zip", "ground_truth"))),
}


@dataclass
class DownloadOutcome:
    folder: Path
    downloaded_bytes: int = 0
    downloaded_files: list[str] = field(default_factory=list)
    extracted: bool = False


def default_data_dir() -> Path:
    """$HAMTUNE_DATA_DIR, else ~/.cache/hamtune/data."""
    env = os.environ.get("HAMTUNE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hamtune" / "data"


def default_base_url() -> str:
    """$HAMTUNE_DATA_URL (a mirror: the folder URL that holds the files), else the ISIC challenge bucket."""
    return os.environ.get("HAMTUNE_DATA_URL") or DEFAULT_BASE_URL


def downloaded_folder(name: str, dest: Path | None = None) -> Path:
    """The extracted folder of a downloaded set; one line telling how to get it when it is not (completely) there."""
    dataset = _dataset(name)
    dest = Path(dest).expanduser() if dest is not None else default_data_dir()
    folder = dest / dataset.name
    if not _is_complete(folder, read_json(dest / MANIFEST).get("files", {}), dataset):
        raise HamtuneError(f"{folder}: no complete download of {dataset.name} here; run `hamtune data download "
                           f"{dataset.name}` (it uses $HAMTUNE_DATA_DIR, else ~/.cache/hamtune/data)")
    return folder


def official_test_set(dest: Path | None = None) -> tuple[Path, Path]:
    """(images folder, ground-truth CSV) of the official test set that `hamtune data download isic2018-test` put
    under dest (default $HAMTUNE_DATA_DIR or ~/.cache/hamtune/data)."""
    folder = downloaded_folder("isic2018-test", dest)
    truth, _ = isic2018.find_label_files(folder)
    if truth is None:
        raise HamtuneError(f"{folder}: no ISIC2018_Task3_Test_GroundTruth.csv; run `hamtune data download "
                           "isic2018-test` again")
    return folder, truth


def download_all(which: str, dest: Path | None = None, base_url: str | None = None, *,
                 retries: int | None = None, echo: Echo = print) -> list[DownloadOutcome]:
    """`hamtune data download WHICH`: one set of DATASETS, or "all" of them in turn, then the data's licence."""
    names = list(DATASETS) if which == "all" else [_dataset(which).name]
    outcomes = [download(name, dest, base_url, retries=DEFAULT_RETRIES if retries is None else retries, echo=echo)
                for name in names]
    echo("")
    echo(LICENCE)
    return outcomes


def download(name: str, dest: Path | None = None, base_url: str | None = None, *, expected: int | None = None,
             retries: int = DEFAULT_RETRIES, progress: bool = True, echo: Echo = print) -> DownloadOutcome:
    """Download, check and extract one set into dest/<name>; a set already there is only re-checked.

    expected: the number of images (and ground-truth rows) the archives must hold; None means the official count in
    DATASETS. Only tests pass another value, for archives built from a small sample.
    """
    dataset = _dataset(name)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise HamtuneError(f"--retries {retries!r}: expected a whole number >= 0")
    expected = dataset.images if expected is None else int(expected)
    dest = Path(dest).expanduser() if dest is not None else default_data_dir()
    base_url = (base_url or default_base_url()).rstrip("/") + "/"
    downloads = dest / DOWNLOADS
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HamtuneError(
            f"{dest}: cannot create the data folder ({err.strerror}); expected a writable path") from None
    folder = dest / dataset.name
    outcome = DownloadOutcome(folder=folder)
    with open(dest / ".lock", "w") as lock:  # two downloads into one folder would write the same .part files
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_json(dest / MANIFEST).get("files", {})
        if _is_complete(folder, manifest, dataset):
            kept = [f for f in dataset.files if (downloads / f.name).is_file()]
            for f in kept:
                _check_recorded(downloads / f.name, manifest[f.name])
            echo(f"{dataset.name}: already downloaded in {folder}; nothing to download ({len(kept)} kept "
                 "archive(s) match the SHA-256 recorded at their first download)")
            return outcome

        with session() as http:
            for remote in dataset.files:
                _fetch_and_check(remote, dest, base_url, manifest, expected, http=http, retries=retries,
                                 progress=progress, outcome=outcome)
        extract(dataset, downloads, folder, manifest, progress=progress)
        outcome.extracted = True
    echo(f"{dataset.name}: {len(outcome.downloaded_files)} file(s) downloaded "
         f"({outcome.downloaded_bytes / 1e6:,.1f} MB), checked and extracted to {folder}")
    return outcome


def _fetch_and_check(remote: RemoteFile, dest: Path, base_url: str, manifest: dict, expected: int, *, http,
                     retries: int, progress: bool, outcome: DownloadOutcome) -> None:
    """One file of a set into downloads/: a kept one checked against its recorded SHA-256, a new one fetched,
    verified, compared with (or recorded as) its first download's SHA-256, and only then renamed into place."""
    downloads = dest / DOWNLOADS
    target = downloads / remote.name
    url = base_url + remote.name
    recorded = manifest.get(remote.name)
    if target.is_file() and recorded:
        _check_recorded(target, recorded)
        return
    if target.is_file():
        part = target  # kept but never recorded (the manifest was lost): check it as if just downloaded
    else:
        part = downloads / f"{remote.name}.part"
        outcome.downloaded_bytes += fetch(url, part, session=http, retries=retries, progress=progress,
                                          desc=remote.name)
        outcome.downloaded_files.append(remote.name)
    try:
        verify(part, remote, expected, where=url if part != target else str(target))
        digest = sha256(part)
        if recorded and recorded["sha256"] != digest:
            raise HamtuneError(f"{url}: SHA-256 {digest} differs from {recorded['sha256']} recorded at its first "
                               f"download ({recorded.get('first_downloaded', '?')}); the server's file changed")
    except HamtuneError as exc:
        discard(part)
        discard(sidecar(part))
        raise HamtuneError(f"{exc}; the file was deleted, so the next run fetches it afresh") from None
    os.replace(part, target)
    discard(sidecar(part))
    if not recorded:
        manifest[remote.name] = {"sha256": digest, "size": target.stat().st_size, "url": url,
                                 "first_downloaded": now_iso()}
        atomic_write_json(dest / MANIFEST, {"files": manifest})


# ---------------------------------------------------------------------------------------------------------------
# Checking a downloaded file


def verify(path: Path, remote: RemoteFile, expected: int, where: str | None = None) -> None:
    """Refuse, with one line, a file whose CRCs, image count, CSV header or row count are not what the set holds.

    where: how messages name the file (its URL when just downloaded); default its path.
    """
    shown = where or str(path)
    if remote.kind == "lesions":
        rows = len(isic2018.read_lesion_groupings(path))
        if rows != expected:
            raise HamtuneError(f"{shown}: {rows} rows; expected {expected} (one per image)")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise HamtuneError(f"{shown}: member {name!r} would be written outside the folder; refused")
            bad = archive.testzip()
            if bad is not None:
                raise HamtuneError(f"{shown}: member {bad} fails its CRC check (a corrupted download)")
            if remote.kind == "images":
                images = [n for n in names if _is_image_member(n)]
                if len(images) != expected:
                    raise HamtuneError(f"{shown}: {len(images)} images; expected {expected}")
            else:
                truths = [n for n in names if isic2018.GROUND_TRUTH.fullmatch(PurePosixPath(n).name)]
                if len(truths) != 1:
                    raise HamtuneError(f"{shown}: {len(truths)} ground-truth CSV files; expected one "
                                       "ISIC2018_Task3_*_GroundTruth.csv")
                with archive.open(truths[0]) as stream:
                    rows = len(isic2018.read_ground_truth(stream, where=f"{remote.name}:{truths[0]}"))
                if rows != expected:
                    raise HamtuneError(f"{shown}: {truths[0]} has {rows} rows; expected {expected}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise HamtuneError(f"{shown}: not a readable zip archive ({err})") from None


def _is_image_member(name: str) -> bool:
    path = PurePosixPath(name)
    return (not name.endswith("/") and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
            and "__MACOSX" not in path.parts)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_recorded(path: Path, recorded: dict) -> None:
    digest = sha256(path)
    if digest != recorded["sha256"]:
        raise HamtuneError(f"{path}: SHA-256 {digest} differs from {recorded['sha256']} recorded at its first download "
                           f"({recorded.get('first_downloaded', '?')}); the file was changed or damaged: delete it "
                           "and run the command again to fetch it afresh")


# ---------------------------------------------------------------------------------------------------------------
# Extracting into place


def extract(dataset: Dataset, downloads: Path, folder: Path, manifest: dict, *, progress: bool = True) -> None:
    """Unpack the set's archives (and copy its CSV) into a temp folder, mark it complete, rename it to `folder`.

    An archive whose members all sit in one top folder named like the archive is unpacked as it is; any other
    archive goes into a folder of its own name, so that two archives' ATTRIBUTION.txt never collide.
    """
    from tqdm import tqdm

    remove_abandoned_temps(folder, COMPLETE)
    tmp = temp_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for remote in dataset.files:
            source = downloads / remote.name
            if not remote.name.endswith(".zip"):
                shutil.copy2(source, tmp / remote.name)
                continue
            with zipfile.ZipFile(source) as archive:
                members = archive.infolist()
                stem = remote.name[:-len(".zip")]
                tops = {PurePosixPath(m.filename).parts[0] for m in members if PurePosixPath(m.filename).parts}
                into = tmp if tops == {stem} else tmp / stem
                for member in tqdm(members, desc=f"extract {remote.name}", unit="file", disable=not progress,
                                   file=sys.stderr, dynamic_ncols=True):
                    archive.extract(member, into)
        marker = {"dataset": dataset.name, "files": {f.name: manifest[f.name]["sha256"] for f in dataset.files},
                  "created": now_iso()}
        replace_folder(tmp, folder, COMPLETE, json.dumps(marker, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_complete(folder: Path, manifest: dict, dataset: Dataset) -> bool:
    """The folder's marker names exactly the archives the manifest records for this set."""
    files = read_json(folder / COMPLETE).get("files")
    return bool(files) and files == {f.name: manifest.get(f.name, {}).get("sha256") for f in dataset.files}


# ---------------------------------------------------------------------------------------------------------------


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise HamtuneError(f"data set {name!r} is unknown; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]
