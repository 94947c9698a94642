"""Label files for evaluating a saved model on an external set: HAM10000 metadata or ISIC 2018 Task 3 ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hamtune.data.isic2018 import read_ground_truth
from hamtune.data.tables import check_dx, read_csv_strings
from hamtune.errors import HamtuneError
from hamtune.vocab import CLASSES, ISIC_COLUMNS


def read_labels(path: Path) -> tuple[pd.DataFrame, str]:
    """Labels from a HAM10000 metadata CSV or an ISIC 2018 Task 3 ground-truth CSV.

    Returns (table with image_id, lesion_id (None when unknown), label, dx, dx_type, age, sex, localization; form
    name). Metadata a file lacks is empty ("" or NaN age); the final report's subgroups say so rather than guess.
    """
    path = Path(path)
    expected = ("expected HAM10000 metadata columns image_id, dx (optionally lesion_id, dx_type, age, sex, "
                f"localization) or ISIC 2018 Task 3 ground-truth columns image, {', '.join(ISIC_COLUMNS)}")
    if not path.is_file():
        raise HamtuneError(f"{path}: labels file not found; {expected}")
    raw = read_csv_strings(path, expected)
    line = np.arange(len(raw)) + 2  # file line of each row; line 1 is the header
    if {"image_id", "dx"} <= set(raw.columns):
        form = "HAM10000 metadata"
        table = pd.DataFrame({"image_id": raw["image_id"].str.strip(), "dx": raw["dx"].str.strip().str.lower()})
        check_dx(table["dx"], raw["dx"], path, line)
        if "lesion_id" in raw.columns:
            lesion = raw["lesion_id"].str.strip()
            table["lesion_id"] = lesion.mask(lesion == "", None)
        else:
            table["lesion_id"] = None
        for column in ("dx_type", "age", "sex", "localization"):
            table[column] = raw[column] if column in raw.columns else ("" if column != "age" else np.nan)
    elif "image" in raw.columns and set(ISIC_COLUMNS) <= set(raw.columns):
        form = "ISIC 2018 Task 3 ground truth"
        table = read_ground_truth(path)  # the one reader of this form, shared with the ISIC 2018 data source
        table["lesion_id"] = None
        table["dx_type"], table["age"], table["sex"], table["localization"] = "", np.nan, "", ""
    else:
        raise HamtuneError(f"{path}: unknown label format (columns: {', '.join(raw.columns) or 'none'}); {expected}")
    if table.empty:
        raise HamtuneError(f"{path}: has a header but no rows; expected one row per labelled image")
    empty = table["image_id"] == ""
    if empty.any():
        raise HamtuneError(f"{path}: line {line[int(np.argmax(empty.to_numpy()))]}: empty image id")
    duplicated = table["image_id"].duplicated()
    if duplicated.any():
        i = int(np.argmax(duplicated.to_numpy()))
        raise HamtuneError(f"{path}: line {line[i]}: image {table['image_id'].iloc[i]} is labelled twice; "
                           "expected each image once")
    table["label"] = table["dx"].map({c: i for i, c in enumerate(CLASSES)}).astype(np.int64)
    return table, form

