"""The Kaggle "Skin Cancer MNIST: HAM10000" layout: HAM10000_metadata.csv beside the image folders, read and validated
row by row. Everything a user can get wrong about the file is one HamtuneError line naming its line; rows and files
that merely do not pair up come back as problems so a run can go on."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hamtune.data.tables import SourceFiles, check_dx, pair_with_files, read_csv_strings
from hamtune.errors import HamtuneError
from hamtune.vocab import CLASSES, METADATA_COLUMNS

METADATA_FILE = "HAM10000_metadata.csv"
LAYOUT_HINT = (f"expected the Kaggle layout: {METADATA_FILE} next to HAM10000_images_part_1/ and "
               "HAM10000_images_part_2/")
_NA_TOKENS = {"", "nan", "na", "n/a", "none", "null", "unknown"}


def read_table(files: SourceFiles) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate HAM10000_metadata.csv and pair its rows with the image files.

    Returns (table, problems): table has TABLE_COLUMNS plus `path`, sorted by image_id, one row per image that has
    both a metadata row and a file; problems lists rows without a file and files without a row.
    """
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
