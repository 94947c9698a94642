"""Image files on disk -> uint8 arrays: finding image files, and the one decoder every path uses.

The cache (training), `evaluate`, `predict` and `serve` all decode through decode_image, so a model sees at inference
exactly the pixels it was trained on. Every image is opened through open_image, which reads the header only and
refuses, before a pixel is decoded, what hamtune will not decode: more than MAX_IMAGE_PIXELS (a 600x450 lesion photo
is 0.27 megapixels; a PNG that declares 100000x100000 is a few hundred bytes and would decode to 30 GB), a side under
MIN_IMAGE_SIDE (a 1x1 image upscaled to the model's size would get a diagnosis from one colour), or a format other
than JPEG/PNG. Pillow's own DecompressionBombWarning is not shown: our limit is below it, so it would only repeat ours.
"""

from __future__ import annotations

import errno
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import as_completed
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from hamtune.data.workers import cpu_count, process_pool
from hamtune.errors import HamtuneError
from hamtune.io import unwritable

PREPROCESS_VERSION = 1  # bump whenever decode_image's output for the same file changes
RESAMPLE = Image.Resampling.LANCZOS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "MPO", "PNG")  # what Pillow calls them (MPO: a camera JPEG with a second frame)
MAX_IMAGE_PIXELS = 40_000_000  # the one limit of every path (prepare, evaluate, predict, serve); below Pillow's 89 M
MIN_IMAGE_SIDE = 8  # pixels on the shorter side; below this an image holds no lesion worth a diagnosis
IMAGE_SIZE_RANGE = (8, 1024)  # the square side a cache entry or a model file may decode to
_PARALLEL_MIN_IMAGES = 256  # below this, starting worker processes costs more than decoding in this process
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings changes process-wide state: one thread at a time


class ImageRefused(HamtuneError):
    """An image refused from its header, before decoding: kind "too_large", "too_small" or "format"."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def check_image_size(size: object, what: str = "image size") -> int:
    """`size` as the int side of a decoded square, or a one-line HamtuneError outside IMAGE_SIZE_RANGE."""
    low, high = IMAGE_SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not low <= size <= high:
        shown = repr(size) if len(repr(size)) <= 40 else repr(size)[:40] + "..."
        raise HamtuneError(f"{what} {shown} is invalid; expected an integer number of pixels from {low} to {high}")
    return int(size)


def open_image(source: str | Path | IO[bytes], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image.open (the header only), refused with ImageRefused above max_pixels, below MIN_IMAGE_SIDE on a side or
    in a format other than IMAGE_FORMATS, before any pixel is decoded. The caller closes the image."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as exc:  # over 2x Pillow's limit: Pillow refuses before we see the size
            found = re.search(r"\((\d+) pixels\)", str(exc))
            over = f"{int(found.group(1)) / 1e6:,.0f} megapixels" if found else "over Pillow's decompression-bomb limit"
            raise ImageRefused(f"image is {over}; at most {max_pixels / 1e6:g} megapixels accepted", "too_large") \
                from None
    try:
        width, height = image.size
        if image.format not in IMAGE_FORMATS:
            raise ImageRefused(f"{image.format} image; expected JPEG or PNG", "format")
        if width * height > max_pixels:
            raise ImageRefused(f"image is {width}x{height} pixels; at most {max_pixels / 1e6:g} megapixels accepted",
                               "too_large")
        if min(width, height) < MIN_IMAGE_SIDE:
            raise ImageRefused(f"image is {width}x{height} pixels; expected at least {MIN_IMAGE_SIDE} pixels on each "
                               "side", "too_small")
    except BaseException:
        image.close()
        raise
    return image


def decode_image(path: str | Path | IO[bytes], size: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one image to uint8 (size, size, 3): short side resized to `size`, centre square kept.

    open_image refuses oversized, degenerate and foreign images first (ImageRefused). JPEG draft mode lets libjpeg
    decode at 1/2, 1/4 or 1/8 scale (never below `size`), which is most of the speed. `load()` is called explicitly so
    that a truncated file raises instead of being padded with grey. Every intermediate image is closed at once, so
    a long-running server holds no pixels between requests.
    """
    with open_image(path, max_pixels) as image:
        image.draft("RGB", (size, size))
        image.load()
        rgb = image.convert("RGB")
    with rgb:
        width, height = rgb.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        with rgb.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side)) as square:
            return np.asarray(square, dtype=np.uint8)


def create_npy(path: Path, shape: tuple[int, ...]) -> None:
    """A new uint8 .npy of `shape`, its disk space reserved up front (posix_fallocate).

    Workers fill it through memory maps; a write through a map into a sparse file on a full disk kills the process
    with SIGBUS, so the space is claimed here, where a full disk is one HamtuneError naming the file (unwritable).
    """
    path = Path(path)
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        del array  # header and size on disk; the pages are claimed next
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it
                    raise
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise unwritable(path, exc) from None


def _reason(err: BaseException) -> str:
    """One line for problems.csv and `predict`: our refusals as they are, a library's error with its type."""
    text = str(err) if isinstance(err, HamtuneError) else f"{type(err).__name__}: {err}"
    return (text.strip().splitlines() or [type(err).__name__])[0]


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
                failures.append((row, _reason(err)))
        out.flush()
    finally:
        del out
        ImageFile.LOAD_TRUNCATED_IMAGES = was_lenient
    return failures


def decode_all(paths: list[str], size: int, out_path: Path, workers: int, progress: bool) -> list[tuple[int, str]]:
    """Decode `paths` into a new (N, size, size, 3) .npy at out_path; return (row, reason) of failed rows."""
    size = check_image_size(size)
    create_npy(out_path, (len(paths), size, size, 3))  # created on disk; workers open it themselves
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
