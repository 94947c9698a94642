"""A data folder, whatever its layout: found, told apart (Kaggle's HAM10000 or the ISIC 2018 Task 3 layout) and read
into the one image table (hamtune.data.tables), with nothing decoded yet."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hamtune.data import ham10000, isic2018
from hamtune.data.images import walk_images
from hamtune.data.tables import SourceFiles
from hamtune.errors import HamtuneError


def scan_source(root: str | Path, split_by: str = "lesion") -> SourceFiles:
    """Find the metadata file in `root` and the image files anywhere below it.

    Kaggle ships the same images twice (HAM10000_images_part_1/ and ham10000_images_part_1/): files that share a stem
    and a size are one image, the first in sorted order is used. Same stem with different sizes is ambiguous and fatal.
    Without HAM10000_metadata.csv, the ISIC 2018 Task 3 layout is looked for (hamtune.data.isic2018). split_by
    "image" is accepted only for an ISIC 2018 folder without lesion ids, where the user asked for it by name.
    """
    if split_by not in isic2018.SPLIT_BY:
        raise HamtuneError(f"split_by {split_by!r} is invalid; expected one of {', '.join(isic2018.SPLIT_BY)}")
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise HamtuneError(f"{root}: data folder does not exist; {ham10000.LAYOUT_HINT}")
    if not root.is_dir():
        raise HamtuneError(f"{root}: is a file, not a data folder; {ham10000.LAYOUT_HINT}")

    found, anything = walk_images(root)
    if not found:
        what = "is empty" if not anything else "holds no .jpg/.jpeg/.png image files (searched all subfolders)"
        raise HamtuneError(f"{root}: data folder {what}; {ham10000.LAYOUT_HINT}")

    metadata, layout, lesions = root / ham10000.METADATA_FILE, "kaggle", None
    if not metadata.is_file():
        matches = sorted(p for p in root.iterdir() if p.name.lower() == ham10000.METADATA_FILE.lower() and p.is_file())
        if matches:
            metadata = matches[0]
        else:
            truth, lesions = isic2018.find_label_files(root)
            if truth is None:
                raise HamtuneError(f"{root}: no metadata file {ham10000.METADATA_FILE} in this folder; {ham10000.LAYOUT_HINT}, "
                                   f"{isic2018.LAYOUT_HINT}")
            metadata, layout = truth, "isic2018"
    if layout == "isic2018":
        isic2018.check_split_by(root, lesions, split_by)
    elif split_by != "lesion":
        raise HamtuneError(f"{root}: split_by {split_by!r} is only for an ISIC 2018 folder without lesion ids; "
                           f"{metadata.name} has them, so drop split_by and let the split group images by lesion")

    found.sort(key=lambda item: item[0])
    images: dict[str, Path] = {}
    sizes: dict[str, tuple[str, int]] = {}
    for rel, path, st in found:
        image_id = os.path.splitext(os.path.basename(rel))[0]
        if image_id in images:
            first_rel, first_size = sizes[image_id]
            if first_size != st.st_size:
                raise HamtuneError(
                    f"{root}: image_id {image_id} has two different files, {first_rel} ({first_size} bytes) and "
                    f"{rel} ({st.st_size} bytes); expected one file per image_id"
                )
            continue
        images[image_id] = Path(path)
        sizes[image_id] = (rel, st.st_size)
    listing = tuple((rel, st.st_size, st.st_mtime_ns) for rel, _, st in found)
    return SourceFiles(root=root, metadata=metadata, images=images, listing=listing, layout=layout, lesions=lesions)


def read_metadata(files: SourceFiles) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate the folder's label file(s) and pair its rows with the image files: (table with TABLE_COLUMNS plus
    `path`, sorted by image_id; problems: rows without a file and files without a row)."""
    if files.layout == "isic2018":
        return isic2018.read_table(files)
    return ham10000.read_table(files)


def load_metadata(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and validate a HAM10000 folder (no image decoding): (table with a `path` column, problems)."""
    return read_metadata(scan_source(root))
