"""Decode-once cache: every image is decoded and resized once per (data, image size) and kept as one uint8 .npy file.

A search runs many trials over the same images; decoding 10,000 JPEGs per trial would dominate its time. So
`prepare` decodes in parallel into cache_dir/<fingerprint>/images.npy, and every later call (and every trial)
memory-maps that file. The fingerprint covers the file list (names, sizes, mtimes), the metadata bytes, the image
size and PREPROCESS_VERSION, so any change to the inputs or the decoding gives a new entry. An entry is built in a
temporary folder and renamed into place with its manifest written last: an interrupted prepare never leaves
something that looks complete.

An entry that looks complete is still checked each time it is opened (open_entry), cheaply: the .npy header against
the manifest (dtype, shape) and the file size against the header; the manifest's checksums of the small files (table,
problems) and of the first and last MiB of images.npy with its size, which is where a crash, a full disk or a copy
cut short leave their mark, without reading a GB array on every open; and the tables must read back. A damaged entry
is rebuilt with one warning line, from `hamtune data prepare` and from `hamtune search` alike (both call prepare), and
an unreadable split file is recomputed the same way. A disk that refuses a write ends in one HamtuneError naming the
path (hamtune.io.unwritable), with the temp folder removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import PIL

from hamtune.data.arrays import SplitArrays, encode_meta
from hamtune.data.download import downloaded_folder
from hamtune.data.images import PREPROCESS_VERSION, check_image_size, create_npy, decode_all
from hamtune.data.isic2018 import check_meta_available
from hamtune.data.sources import read_metadata, scan_source
from hamtune.data.split import SPLITS, SplitSpec, load_or_make_split
from hamtune.data.synthetic import DEFAULT_IMAGE_SIZE, SYNTHETIC_VERSION, generate_synthetic
from hamtune.data.tables import PROBLEM_COLUMNS, TABLE_COLUMNS, SourceFiles, make_problems
from hamtune.data.workers import cpu_count
from hamtune.errors import HamtuneError
from hamtune.io import (atomic_write_bytes, now_iso, remove_abandoned_temps, replace_folder, temp_sibling,
                        unwritable)

MANIFEST = "manifest.json"
CHECKED_FILES = ("table.parquet", "problems.csv")  # small: hashed whole; images.npy: its ends (ends_digest)
END_BLOCK = 1 << 20  # bytes hashed at each end of images.npy
log = logging.getLogger("hamtune.data")


@dataclass
class PreparedData:
    """A decoded, split dataset: images memory-mapped from the cache entry, one table row per image."""

    path: Path
    fingerprint: str
    image_size: int
    images: np.ndarray  # uint8 (N, S, S, 3), read-only memory map
    table: pd.DataFrame  # TABLE_COLUMNS + split, row i describes images[i]
    split: SplitSpec
    decoded: int  # images decoded by the call that returned this (0 when the cache entry was reused)
    problems: pd.DataFrame = field(default_factory=make_problems)  # skipped items, PROBLEM_COLUMNS

    def arrays(self, *splits: str) -> SplitArrays:
        """Rows of the given splits (all rows when none given) in table order, images copied out of the map."""
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise HamtuneError(f"split {unknown[0]!r} is unknown; expected one of {', '.join(SPLITS)}")
        selected = self.table["split"].isin(splits).to_numpy() if splits else np.ones(len(self.table), dtype=bool)
        index = np.flatnonzero(selected).astype(np.int64)
        rows = self.table.iloc[index]
        return SplitArrays(
            images=self.images[index],
            labels=rows["label"].to_numpy(dtype=np.int64),
            meta=encode_meta(rows),
            index=index,
        )

    def describe(self) -> str:
        """One line: decoded or reused, how many images at what size, where, and what was skipped."""
        verb = "decoded" if self.decoded else "reused"
        skipped = (f" ({len(self.problems)} skipped, listed in {self.path / 'problems.csv'})"
                   if len(self.problems) else "")
        return f"{verb} {len(self.table)} images at {self.image_size}px -> {self.path}{skipped}"

    def split_sizes(self) -> dict[str, dict]:
        """Images and distinct lesions per split."""
        groups = self.table.groupby("split")
        return {
            name: {
                "images": int((self.table["split"] == name).sum()),
                "lesions": int(groups.get_group(name)["lesion_id"].nunique()) if name in groups.groups else 0,
            }
            for name in SPLITS
        }


def default_cache_dir() -> Path:
    """$HAMTUNE_CACHE_DIR, else ~/.cache/hamtune."""
    env = os.environ.get("HAMTUNE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hamtune"


def fingerprint(files: SourceFiles, image_size: int) -> str:
    """Hash of everything the decoded arrays depend on: file list, metadata bytes, image size, PREPROCESS_VERSION."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"preprocess_version": PREPROCESS_VERSION, "image_size": image_size}).encode())
    digest.update(files.metadata.read_bytes())
    if files.lesions is not None:  # ISIC 2018 layout: lesion ids come from a second file
        digest.update(b"\0lesions\0" + files.lesions.read_bytes())
    for rel, size, mtime_ns in files.listing:
        digest.update(f"\0{rel}\0{size}\0{mtime_ns}".encode())
    return digest.hexdigest()[:20]


class DamagedEntry(Exception):
    """A cache entry that looks complete (it has its manifest) but is not what its manifest says."""


def ends_digest(path: Path) -> str:
    """SHA-256 of a file's size and its first and last END_BLOCK bytes: what a write cut short changes, read in
    two blocks whatever the file's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(str(size).encode() + b"\0" + f.read(END_BLOCK))
        if size > END_BLOCK:
            f.seek(max(END_BLOCK, size - END_BLOCK))
            digest.update(f.read(END_BLOCK))
    return digest.hexdigest()


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from an .npy header, read without loading (or unpickling) it."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = read_header[version](f)
        return shape, dtype, fortran, f.tell()


def open_entry(entry: Path, image_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(table, problems) of a complete, intact cache entry; None when there is none (absent, or unfinished: no
    manifest, which an interrupted prepare leaves); DamagedEntry, with a one-line reason, when it has its manifest but
    its files do not match it. Cheap: headers, sizes, checksums of the small files and of images.npy's ends."""
    try:
        text = (entry / MANIFEST).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedEntry(f"{MANIFEST} unreadable ({exc})") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise DamagedEntry(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise DamagedEntry(f"{MANIFEST} is not a JSON object")
    if manifest.get("preprocess_version") != PREPROCESS_VERSION:
        return None  # another decoder's entry (its fingerprint differs; a copied folder): redone without fuss
    n, side = manifest.get("images"), manifest.get("image_size")
    if not isinstance(n, int) or not isinstance(side, int) or (image_size is not None and side != image_size):
        raise DamagedEntry(f"{MANIFEST} gives images={n!r}, image_size={side!r}; expected integers"
                           + (f", image_size {image_size}" if image_size is not None else ""))
    images = entry / "images.npy"
    expected = (n, side, side, 3)
    try:
        shape, dtype, fortran, offset = _npy_layout(images)
        size = images.stat().st_size
    except FileNotFoundError:
        raise DamagedEntry("images.npy is missing") from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise DamagedEntry(f"images.npy has no readable .npy header ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if shape != expected or dtype != np.uint8 or fortran:
        raise DamagedEntry(f"images.npy holds {dtype} {shape}{' (Fortran order)' if fortran else ''}; its manifest "
                           f"says uint8 {expected}")
    if size != offset + math.prod(expected):
        raise DamagedEntry(f"images.npy is {size} bytes; its header promises {offset + math.prod(expected)} "
                           "(a write cut short)")
    checksums = manifest.get("checksums")
    if isinstance(checksums, dict):  # entries written before checksums existed get the checks above only
        for name, recorded in checksums.items():
            path = entry / name
            try:
                actual = ends_digest(path) if name == "images.npy" else hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                raise DamagedEntry(f"{name} is missing or unreadable") from None
            if actual != recorded:
                raise DamagedEntry(f"{name} does not match the checksum in its manifest (changed or cut short "
                                   "after it was written)")
    try:
        table = pd.read_parquet(entry / "table.parquet")
        problems = pd.read_csv(entry / "problems.csv", dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pyarrow and pandas raise many types for a cut-short file
        raise DamagedEntry(f"its tables do not read back ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:120]})") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if len(table) != n or missing:
        raise DamagedEntry(f"table.parquet has {len(table)} rows" + (f", lacking {', '.join(missing)}" if missing
                                                                      else "") + f"; the manifest says {n} images")
    return table, problems


def _intact(entry: Path) -> bool:
    try:
        return open_entry(entry) is not None
    except DamagedEntry:
        return False


def _commit(tmp: Path, target: Path) -> None:
    """Move a finished temp folder into place; if another process got there first, keep theirs."""
    if target.exists() and not _intact(target):
        shutil.rmtree(target, ignore_errors=True)  # unfinished (no manifest) or damaged
    try:
        os.rename(tmp, target)
    except OSError:
        if not _intact(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_rows(src: Path, dst: Path, keep: np.ndarray, block: int = 1024) -> None:
    """Copy the kept rows of an .npy into a new one, a block at a time (never both arrays in RAM)."""
    source = np.load(src, mmap_mode="r", allow_pickle=False)
    create_npy(dst, (len(keep),) + source.shape[1:])
    out = np.load(dst, mmap_mode="r+", allow_pickle=False)
    for i in range(0, len(keep), block):
        out[i:i + block] = source[keep[i:i + block]]
    out.flush()
    del out, source
    src.unlink()


def _build_entry(files: SourceFiles, table: pd.DataFrame, problems: pd.DataFrame, image_size: int, target: Path,
                 workers: int, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode into a temp folder next to `target`, then rename it into place. Returns the final (table, problems)."""
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        raw = tmp / "decoded.npy"
        failures = decode_all(table["path"].tolist(), image_size, raw, workers, progress)
        if failures:
            bad_rows = [row for row, _ in failures]
            unreadable = make_problems([
                ("unreadable_image", table["image_id"].iat[row],
                 Path(table["path"].iat[row]).relative_to(files.root).as_posix(), reason)
                for row, reason in failures
            ])
            problems = pd.concat([problems, unreadable], ignore_index=True)
            keep = np.setdiff1d(np.arange(len(table)), bad_rows)
            if len(keep) == 0:
                raise HamtuneError(f"{files.root}: none of the {len(table)} listed images could be decoded; "
                                   f"first failure: {table['image_id'].iat[bad_rows[0]]}: {failures[0][1]}")
            _drop_rows(raw, tmp / "images.npy", keep)
            table = table.iloc[keep].reset_index(drop=True)
        else:
            os.replace(raw, tmp / "images.npy")
        seconds = time.perf_counter() - started
        buf = io.BytesIO()
        table[list(TABLE_COLUMNS)].to_parquet(buf, index=False)
        small = {"table.parquet": buf.getvalue(), "problems.csv": problems.to_csv(index=False).encode()}
        for name, data in small.items():
            atomic_write_bytes(tmp / name, data)
        manifest = {
            "preprocess_version": PREPROCESS_VERSION,
            "fingerprint": target.name,
            "image_size": image_size,
            "images": len(table),
            "problems": {kind: int(n) for kind, n in problems["kind"].value_counts().items()},
            "source": str(files.root),
            "metadata_file": files.metadata.name,
            "layout": files.layout,
            "decode_seconds": round(seconds, 3),
            "created": now_iso(),
            "versions": {"numpy": np.__version__, "pillow": PIL.__version__, "pandas": pd.__version__},
            "checksums": {"images.npy": ends_digest(tmp / "images.npy"),
                          **{name: hashlib.sha256(data).hexdigest() for name, data in small.items()}},
        }
        atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())  # last: marks it complete
        _commit(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            exc = unwritable(target, exc)
        if isinstance(exc, HamtuneError):  # a refused write names the file where the entry wanted it, not the temp
            raise HamtuneError(str(exc).replace(str(tmp), str(target))) from None
        raise
    return table, problems


def synthetic_source(cache_dir: Path, n_images: int, seed: int, workers: int | None, progress: bool) -> Path:
    """The synthetic dataset for (n_images, seed), generated once under cache_dir/synthetic/ and reused after."""
    target = Path(cache_dir) / "synthetic" / f"n{n_images}-seed{seed}"
    marker = target / ".complete"
    expected = {"synthetic_version": SYNTHETIC_VERSION, "n_images": n_images, "seed": seed,
                "image_size": list(DEFAULT_IMAGE_SIZE)}
    try:
        if json.loads(marker.read_text()) == expected:
            return target
    except (OSError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temps(target, ".complete")
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate_synthetic(tmp, n_images=n_images, seed=seed, workers=workers, progress=progress)
        replace_folder(tmp, target, ".complete", json.dumps(expected))
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise unwritable(tmp, exc) from None
        raise
    return target


def _problem_summary(problems: pd.DataFrame) -> str:
    counts = problems["kind"].value_counts()
    parts = [
        f"{counts.get('missing_image', 0)} metadata rows without an image file",
        f"{counts.get('unlisted_image', 0)} image files without a metadata row",
        f"{counts.get('unreadable_image', 0)} unreadable images",
    ]
    return ", ".join(parts)


def prepare(source: str | Path, image_size: int, *, cache_dir: Path | None = None, split: SplitSpec = SplitSpec(),
            strict: bool = False, workers: int | None = None, progress: bool = True,
            synthetic_size: int = 3000, synthetic_seed: int = 0, split_by: str = "lesion",
            needs_meta: bool = False) -> PreparedData:
    """Read, validate, decode (once) and split a HAM10000 folder, or the synthetic stand-in for source="synthetic".

    source "isic2018" is the training set that `hamtune data download isic2018-train` put in the default folder.
    split_by "image" is for an ISIC 2018 folder without lesion ids only; needs_meta refuses a layout without
    age/sex/site before anything is decoded.

    Rows and files that do not pair up, and files that do not decode, are skipped, warned about in one line and
    listed in problems.csv in the cache entry; with strict=True they are a HamtuneError instead.
    """
    image_size = check_image_size(image_size)
    if not isinstance(split, SplitSpec):
        raise HamtuneError(f"split {split!r} is invalid; expected a SplitSpec(val, test, seed)")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HamtuneError(
            f"{cache_dir}: cannot create the cache folder ({err.strerror}); expected a writable path") from None
    workers = cpu_count() if workers is None else max(1, int(workers))

    if str(source) == "synthetic":
        root = synthetic_source(cache_dir, synthetic_size, synthetic_seed, workers, progress)
    elif str(source) == "isic2018":
        root = downloaded_folder("isic2018-train")
    else:
        root = Path(source)
    files = scan_source(root, split_by)
    if needs_meta:
        check_meta_available(files.root, files.layout)
    key = fingerprint(files, image_size)
    entry = cache_dir / key

    decoded = 0
    try:
        opened = open_entry(entry, image_size)
    except DamagedEntry as damage:
        log.warning("%s: damaged cache entry: %s; rebuilding it", entry, damage)
        shutil.rmtree(entry, ignore_errors=True)
        opened = None
    if opened is not None:
        table, problems = opened
    else:
        table, problems = read_metadata(files)
        if strict and len(problems):
            raise HamtuneError(f"{files.root}: strict mode: {_problem_summary(problems)}; first: "
                               f"{problems['image_id'].iat[0]} ({problems['detail'].iat[0]})")
        remove_abandoned_temps(entry)
        table, problems = _build_entry(files, table, problems, image_size, entry, workers, progress)
        decoded = len(table) + int((problems["kind"] == "unreadable_image").sum())
    problems = problems.reindex(columns=list(PROBLEM_COLUMNS))

    if len(problems):
        if strict:
            raise HamtuneError(f"{files.root}: strict mode: {_problem_summary(problems)}; "
                               f"listed in {entry / 'problems.csv'}")
        log.warning("%s: skipped %d items: %s; listed in %s", files.root, len(problems), _problem_summary(problems),
                    entry / "problems.csv")

    table = table[list(TABLE_COLUMNS)].copy()
    table["split"] = _entry_split(entry, table, split)
    images = np.load(entry / "images.npy", mmap_mode="r", allow_pickle=False)
    if len(images) != len(table):
        raise HamtuneError(f"{entry}: images.npy has {len(images)} rows but table.parquet {len(table)}; "
                           "expected equal counts (delete this cache folder)")
    return PreparedData(path=entry, fingerprint=key, image_size=image_size, images=images, table=table, split=split,
                        decoded=decoded, problems=problems)


def _entry_split(entry: Path, table: pd.DataFrame, split: SplitSpec) -> np.ndarray:
    """load_or_make_split, with a saved split file that does not read back (cut short, overwritten) recomputed with
    one warning line: the split is a pure function of the table and the spec, so nothing is lost."""
    saved = entry / split.filename
    if saved.is_file():
        try:
            pd.read_parquet(saved)  # a few kB
        except Exception as exc:  # noqa: BLE001 - pyarrow's many errors for a damaged parquet file
            log.warning("%s: damaged split file (%s: %s); recomputing it", saved, type(exc).__name__,
                        (str(exc).splitlines() or [""])[0][:120])
            saved.unlink(missing_ok=True)
    return load_or_make_split(entry, table, split)


def prepare_spec_data(settings, *, cache_dir: Path | None = None, progress: bool = True,
                      needs_meta: bool = False) -> PreparedData:
    """prepare() with a search spec's data section (hamtune.search.spec.DataSettings): the one mapping of settings onto it.

    cache_dir, when given, is used where the settings name none (a recorded experiment remembers its cache).
    needs_meta: some trial uses age/sex/site (refused, before decoding, for data without them).
    """
    cache = Path(settings.cache_dir) if settings.cache_dir else cache_dir
    return prepare(settings.source, settings.image_size, cache_dir=cache, strict=settings.strict, progress=progress,
                   split=SplitSpec(val=settings.val, test=settings.test, seed=settings.split_seed),
                   synthetic_size=settings.synthetic_size, synthetic_seed=settings.synthetic_seed,
                   split_by=settings.split_by, needs_meta=needs_meta)
