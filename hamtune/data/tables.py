"""What every data layout reads into: the image table and its problems list, the one CSV reader of label files, and
the pairing of label rows with image files.

Layout readers (hamtune.data.ham10000 for Kaggle's, hamtune.data.isic2018 for the challenge's) build on these, so
every layout refuses a bad file in the same words and returns the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from hamtune.errors import HamtuneError
from hamtune.vocab import CLASSES

PROBLEM_KINDS = ("missing_image", "unlisted_image", "unreadable_image")
PROBLEM_COLUMNS = ("kind", "image_id", "path", "detail")
TABLE_COLUMNS = ("image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex", "localization")


@dataclass(frozen=True)
class SourceFiles:
    """What a data folder holds, found without decoding anything (cheap enough to run on every prepare)."""

    root: Path
    metadata: Path
    images: dict[str, Path]  # image_id -> file; one file per id
    listing: tuple[tuple[str, int, int], ...]  # (relative name, size, mtime_ns) of every image file, sorted
    layout: str = "kaggle"  # "kaggle" (HAM10000_metadata.csv) or "isic2018" (metadata is the ground-truth CSV)
    lesions: Path | None = None  # isic2018: the lesion-groupings CSV (None: split_by image, asked for by name)


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
