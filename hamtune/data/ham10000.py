"""HAM10000 constants: the fixed class order, diagnosis names and the metadata encoding used everywhere, and the
validating reader of the Kaggle folder layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from hamtune.data.images import walk_images
from hamtune.errors import HamtuneError

# One class order for the whole product: labels, model outputs, reports and saved models all use it.
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NUM_CLASSES = len(CLASSES)
DIAGNOSES = {
    "akiec": "Actinic keratoses / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesions",
}
# Class frequencies of the full HAM10000 release (10,015 images).
HAM10000_FREQUENCIES = {
    "akiec": 0.033, "bcc": 0.051, "bkl": 0.110, "df": 0.011, "mel": 0.111, "nv": 0.669, "vasc": 0.014,
}
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
SEXES = ("male", "female", "unknown")
LOCALIZATIONS = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
    "neck", "scalp", "trunk", "unknown", "upper extremity",
)
# The ISIC 2018 Task 3 ground-truth column order (one-hot per image), as the challenge's files and scorer use it.
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
# age/100, sex one-hot, localization one-hot
META_DIM = 1 + len(SEXES) + len(LOCALIZATIONS)

# ---------------------------------------------------------------------------------------------------------------
# The validating reader of the Kaggle layout. Everything a user can get wrong about the folder is reported here as a
# one-line HamtuneError; rows and files that merely do not pair up are returned as `problems` so a run can go on.

METADATA_FILE = "HAM10000_metadata.csv"
PROBLEM_KINDS = ("missing_image", "unlisted_image", "unreadable_image")
PROBLEM_COLUMNS = ("kind", "image_id", "path", "detail")
TABLE_COLUMNS = ("image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex", "localization")
_LAYOUT_HINT = (f"expected the Kaggle layout: {METADATA_FILE} next to HAM10000_images_part_1/ and "
                "HAM10000_images_part_2/")
_NA_TOKENS = {"", "nan", "na", "n/a", "none", "null", "unknown"}


@dataclass(frozen=True)
class SourceFiles:
    """What a data folder holds, found without decoding anything (cheap enough to run on every prepare)."""

    root: Path
    metadata: Path
    images: dict[str, Path]  # image_id -> file; one file per id
    listing: tuple[tuple[str, int, int], ...]  # (relative name, size, mtime_ns) of every image file, sorted
    layout: str = "kaggle"  # "kaggle" (HAM10000_metadata.csv) or "isic2018" (metadata is the ground-truth CSV)
    lesions: Path | None = None  # isic2018: the lesion-groupings CSV (None: split_by image, asked for by name)


def scan_source(root: str | Path, split_by: str = "lesion") -> SourceFiles:
    """Find the metadata file in `root` and the image files anywhere below it.

    Kaggle ships the same images twice (HAM10000_images_part_1/ and ham10000_images_part_1/): files that share a stem
    and a size are one image, the first in sorted order is used. Same stem with different sizes is ambiguous and fatal.
    Without HAM10000_metadata.csv, the ISIC 2018 Task 3 layout is looked for (hamtune.data.isic2018). split_by
    "image" is accepted only for an ISIC 2018 folder without lesion ids, where the user asked for it by name.
    """
    from hamtune.data import isic2018

    if split_by not in isic2018.SPLIT_BY:
        raise HamtuneError(f"split_by {split_by!r} is invalid; expected one of {', '.join(isic2018.SPLIT_BY)}")
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise HamtuneError(f"{root}: data folder does not exist; {_LAYOUT_HINT}")
    if not root.is_dir():
        raise HamtuneError(f"{root}: is a file, not a data folder; {_LAYOUT_HINT}")

    found, anything = walk_images(root)
    if not found:
        what = "is empty" if not anything else "holds no .jpg/.jpeg/.png image files (searched all subfolders)"
        raise HamtuneError(f"{root}: data folder {what}; {_LAYOUT_HINT}")

    metadata, layout, lesions = root / METADATA_FILE, "kaggle", None
    if not metadata.is_file():
        matches = sorted(p for p in root.iterdir() if p.name.lower() == METADATA_FILE.lower() and p.is_file())
        if matches:
            metadata = matches[0]
        else:
            truth, lesions = isic2018.find_label_files(root)
            if truth is None:
                raise HamtuneError(f"{root}: no metadata file {METADATA_FILE} in this folder; {_LAYOUT_HINT}, "
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


def read_csv_strings(path: Path | IO[bytes], expected: str, where: str | None = None) -> pd.DataFrame:
    """A CSV as stripped strings (BOM tolerated, nothing parsed as NaN); unreadable -> one line ending in `expected`.

    The one reader of HAM10000 metadata and label files, so both refuse a bad file in the same words. `path` may be
    an open binary stream (a zip member), which `where` then names in messages.
    """
    where = where or path
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise HamtuneError(f"{where}: file is empty; {expected}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HamtuneError(f"{where}: cannot be read as CSV ({first}); {expected}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    return raw


def check_dx(dx: pd.Series, raw_dx: pd.Series, path: Path, line) -> None:
    """Refuse the first value of `dx` (lower-cased codes) that is not one of CLASSES, naming its file line."""
    unknown = ~dx.isin(CLASSES)
    if unknown.any():
        first = int(np.argmax(unknown.to_numpy()))
        raise HamtuneError(f"{path}: line {line[first]}: dx {raw_dx.iloc[first]!r} is not a HAM10000 diagnosis code; "
                           f"expected one of {', '.join(CLASSES)}")


def read_metadata(files: SourceFiles) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate the metadata file and pair its rows with the image files.

    Returns (table, problems): table has TABLE_COLUMNS plus `path`, sorted by image_id, one row per image that has
    both a metadata row and a file; problems lists rows without a file and files without a row.
    """
    if files.layout == "isic2018":
        from hamtune.data.isic2018 import read_table

        return read_table(files)
    path = files.metadata
    raw = read_csv_strings(path, f"expected a comma-separated HAM10000 metadata file with header {','.join(METADATA_COLUMNS)}")
    missing = [c for c in METADATA_COLUMNS if c not in raw.columns]
    if missing:
        raise HamtuneError(
            f"{path}: missing column(s) {', '.join(missing)}; expected columns {', '.join(METADATA_COLUMNS)}"
        )
    if raw.empty:
        raise HamtuneError(f"{path}: metadata file has a header but no rows; expected one row per image")
    meta = raw[list(METADATA_COLUMNS)].apply(lambda col: col.str.strip())
    line = pd.Series(np.arange(len(meta)) + 2, index=meta.index)  # 1-based file line; line 1 is the header

    for column in ("image_id", "lesion_id"):
        empty = meta[column] == ""
        if empty.any():
            raise HamtuneError(f"{path}: line {line[empty].iloc[0]}: {column} is empty; expected an id on every row")

    meta["dx"] = meta["dx"].str.lower()
    check_dx(meta["dx"], raw["dx"], path, line.to_numpy())

    duplicated = meta["image_id"].duplicated(keep=False)
    if duplicated.any():
        image_id = meta.loc[duplicated.idxmax(), "image_id"]
        lines = ", ".join(str(n) for n in line[meta["image_id"] == image_id])
        raise HamtuneError(f"{path}: image_id {image_id} appears on lines {lines}; expected each image listed once")

    age_text = meta["age"].str.lower()
    age = pd.to_numeric(age_text.where(~age_text.isin(_NA_TOKENS)), errors="coerce")
    bad_age = age.isna() & ~age_text.isin(_NA_TOKENS)
    if bad_age.any():
        first = bad_age.idxmax()
        raise HamtuneError(
            f"{path}: line {line[first]}: age {raw.loc[first, 'age']!r} is not a number; expected years or empty")
    meta["age"] = age.astype("float64")
    for column in ("dx_type", "sex", "localization"):
        meta[column] = meta[column].str.lower().replace("", "unknown")
    meta["label"] = meta["dx"].map({code: i for i, code in enumerate(CLASSES)}).astype("int64")

    return pair_with_files(meta, files, path, line.to_numpy(), id_column="image_id")


def pair_with_files(meta: pd.DataFrame, files: SourceFiles, path: Path, line, *, id_column: str
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of a labels file (TABLE_COLUMNS) joined to the image files: (table + path sorted by image_id, problems).

    Rows without a file and files without a row become problems (a run goes on without them); no match at all is
    an error. `line` holds each row's line in `path`; `id_column` is what the file calls the image id.
    """
    has_file = meta["image_id"].isin(files.images.keys()).to_numpy()
    listed = set(meta["image_id"])
    problems = [
        ("missing_image", image_id, "", f"{path.name} line {n} lists it but no image file with that name was found")
        for image_id, n in zip(meta.loc[~has_file, "image_id"], line[~has_file])
    ]
    problems += [
        ("unlisted_image", image_id, file.relative_to(files.root).as_posix(), f"no row in {path.name}")
        for image_id, file in sorted(files.images.items())
        if image_id not in listed
    ]
    table = meta.loc[has_file, list(TABLE_COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)
    table["path"] = [str(files.images[image_id]) for image_id in table["image_id"]]
    if table.empty:
        raise HamtuneError(
            f"{path}: none of its {len(meta)} rows matches one of the {len(files.images)} image files under "
            f"{files.root}; expected image file names ISIC_xxxxxxx.jpg equal to the {id_column} column")
    return table, make_problems(problems)


def make_problems(rows: list[tuple[str, str, str, str]] | None = None) -> pd.DataFrame:
    """The problems table (one row per skipped item), always with the same columns, even when empty."""
    return pd.DataFrame(rows or [], columns=list(PROBLEM_COLUMNS), dtype=str)


def load_metadata(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and validate a HAM10000 folder (no image decoding): (table with a `path` column, problems)."""
    return read_metadata(scan_source(root))


def encode_meta(table: pd.DataFrame) -> np.ndarray:
    """Metadata features for the model: age/100 (missing -> 0.5), sex one-hot, localization one-hot.

    Values outside SEXES / LOCALIZATIONS (including missing) count as "unknown", so any table encodes.
    """
    n = len(table)
    out = np.zeros((n, META_DIM), dtype=np.float32)
    age = pd.to_numeric(table["age"], errors="coerce").to_numpy(dtype=np.float64) / 100.0
    out[:, 0] = np.where(np.isnan(age), 0.5, age)
    offset = 1
    for column, vocabulary in (("sex", SEXES), ("localization", LOCALIZATIONS)):
        values = table[column].astype("string").str.strip().str.lower().fillna("unknown")
        codes = pd.Categorical(values, categories=vocabulary).codes.astype(np.int64)
        codes[codes < 0] = vocabulary.index("unknown")
        out[np.arange(n), offset + codes] = 1.0
        offset += len(vocabulary)
    return out
