"""Image files on disk -> uint8 arrays: finding image files, and the one decoder every path uses.

The cache (training), `evaluate`, `predict` and `serve` all decode through decode_image, so a model sees at inference
exactly the pixels it was trained on.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from hamtune.data.workers import cpu_count, process_pool
from hamtune.errors import HamtuneError

PREPROCESS_VERSION = 1  # bump whenever decode_image's output for the same file changes
RESAMPLE = Image.Resampling.LANCZOS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PARALLEL_MIN_IMAGES = 256  # below this, starting worker processes costs more than decoding in this process


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image to uint8 (size, size, 3): short side resized to `size`, centre square kept.

    JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale (never below `size`), which is most of the speed.
    `load()` is called explicitly so that a truncated file raises instead of being padded with grey.
    """
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        image.load()
        rgb = image.convert("RGB")
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    square = rgb.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))
    return np.asarray(square, dtype=np.uint8)


def _decode_rows(npy_path: str, start: int, paths: list[str], size: int) -> list[tuple[int, str]]:
    """Decode paths into rows start.. of the .npy file; return (row, reason) for files that could not be decoded."""
    failures = []
    was_lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whatever another library set
    out = np.load(npy_path, mmap_mode="r+")
    try:
        for row, path in enumerate(paths, start):
            try:
                out[row] = decode_image(path, size)
            except Exception as err:  # noqa: BLE001 - whatever the decoder raises, the file is unusable
                failures.append((row, f"{type(err).__name__}: {err}".splitlines()[0]))
        out.flush()
    finally:
        del out
        ImageFile.LOAD_TRUNCATED_IMAGES = was_lenient
    return failures


def decode_all(paths: list[str], size: int, out_path: Path, workers: int, progress: bool) -> list[tuple[int, str]]:
    """Decode `paths` into a new (N, size, size, 3) .npy at out_path; return (row, reason) of failed rows."""
    images = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del images  # created on disk; workers open it themselves
    chunk = max(16, min(512, math.ceil(len(paths) / (workers * 8))))
    starts = range(0, len(paths), chunk)
    failures: list[tuple[int, str]] = []
    with tqdm(total=len(paths), desc=f"decode {size}px", unit="img", disable=not progress, file=sys.stderr) as bar:
        if workers > 1 and len(paths) >= _PARALLEL_MIN_IMAGES:
            with process_pool(min(workers, len(starts))) as pool:
                futures = {
                    pool.submit(_decode_rows, str(out_path), s, paths[s:s + chunk], size): len(paths[s:s + chunk])
                    for s in starts
                }
                for future in as_completed(futures):
                    failures += future.result()
                    bar.update(futures[future])
        else:
            for s in starts:
                failures += _decode_rows(str(out_path), s, paths[s:s + chunk], size)
                bar.update(len(paths[s:s + chunk]))
    return sorted(failures)


def walk_images(root: Path) -> tuple[list[tuple[str, str, os.stat_result]], bool]:
    """(relative posix name, path, stat) of every image file below root, skipping hidden files and folders; and
    whether root holds anything at all. scandir, not os.walk + stat: the stat comes with the directory listing."""
    found = []
    anything = False
    seen_dirs = set()
    pending = [str(root)]
    prefix = len(str(root)) + 1
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                anything = True
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():  # follows symlinks; the inode set stops link loops
                    key = (entry.stat().st_dev, entry.stat().st_ino)
                    if key not in seen_dirs:
                        seen_dirs.add(key)
                        pending.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    found.append((entry.path[prefix:].replace(os.sep, "/"), entry.path, entry.stat()))
    return found, anything


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly, or found recursively (.jpg/.jpeg/.png in any case) under folders; sorted."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            inside, _ = walk_images(item)
            if not inside:
                raise HamtuneError(f"{item}: folder holds no .jpg/.jpeg/.png image files (searched all subfolders)")
            found += sorted(Path(path) for _, path, _ in inside)
        elif item.is_file():
            found.append(item)
        else:
            raise HamtuneError(f"{item}: no such image file or folder")
    return found


def decode_files(paths: Sequence[Path], size: int, workdir: Path, progress: bool = False) -> tuple[np.ndarray, list]:
    """Decode with decode_image into workdir; (uint8 images of the readable files, failures).

    failures: (position in `paths`, reason). The images are memory-mapped from workdir, so keep it until done.
    """
    npy = Path(workdir) / "decoded.npy"
    failures = decode_all([str(p) for p in paths], size, npy, cpu_count(), progress)
    images = np.load(npy, mmap_mode="r")
    if failures:
        keep = np.setdiff1d(np.arange(len(paths)), [row for row, _ in failures])
        images = images[keep]
    return images, failures
