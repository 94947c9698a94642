"""The ISIC 2018 Task 3 layout (what `hamtune data download` fetches), read into the same table as the Kaggle layout,
and the official challenge's file formats: the submission CSV and the test set's scoring rule.

The challenge publishes HAM10000 as images plus a one-hot ground-truth CSV (`image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`)
and, for the training set only, a lesion-groupings CSV (`image,lesion_id,diagnosis_confirm_type`). Files are found
by name at any depth, so a folder extracted by hand reads like one extracted by the downloader. Age, sex and site
are not part of this layout: the table says "unknown" and use_meta is refused (see check_meta_available).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import pandas as pd

from hamtune.data.tables import pair_with_files, read_csv_strings
from hamtune.errors import HamtuneError
from hamtune.io import write_csv
from hamtune.vocab import CLASSES, ISIC_COLUMNS

GROUND_TRUTH = re.compile(r"isic2018_task3_(training|validation|test)_groundtruth\.csv", re.IGNORECASE)
LESION_GROUPINGS = re.compile(r"isic2018_task3_\w*lesiongroupings\.csv", re.IGNORECASE)
LESION_COLUMNS = ("image", "lesion_id", "diagnosis_confirm_type")
SPLIT_BY = ("lesion", "image")
# The official scorer's truth loader gives this image of the 2018 Task 3 test set zero weight
# (isic_challenge_scoring.load_csv.parse_truth_csv), so hamtune's scores on that set leave it out too.
OFFICIAL_ZERO_WEIGHT = ("ISIC_0035068",)
LAYOUT_HINT = ("or the ISIC 2018 Task 3 layout: images with ISIC2018_Task3_*_GroundTruth.csv "
               "(`hamtune data download isic2018-train`)")


def find_label_files(root: Path) -> tuple[Path | None, Path | None]:
    """(ground-truth CSV, lesion-groupings CSV) anywhere below root, hidden folders skipped; None where absent.

    Two ground-truth files (say the training and the test set side by side) are ambiguous and refused.
    """
    truths, lesions = [], []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if GROUND_TRUTH.fullmatch(name):
                truths.append(Path(folder) / name)
            elif LESION_GROUPINGS.fullmatch(name):
                lesions.append(Path(folder) / name)
    if len(truths) > 1:
        shown = ", ".join(str(p.relative_to(root)) for p in sorted(truths))
        raise HamtuneError(f"{root}: holds {len(truths)} ISIC 2018 ground-truth files ({shown}); expected one: "
                           "pass the folder of one set (e.g. .../isic2018-train)")
    if len(lesions) > 1:
        shown = ", ".join(str(p.relative_to(root)) for p in sorted(lesions))
        raise HamtuneError(f"{root}: holds {len(lesions)} lesion-groupings files ({shown}); expected at most one")
    return (truths[0] if truths else None), (lesions[0] if lesions else None)


def check_split_by(root: Path, lesions: Path | None, split_by: str) -> None:
    """A lesion split needs lesion ids; an image split is allowed only where there are none and the user asked."""
    if split_by == "lesion" and lesions is None:
        raise HamtuneError(
            f"{root}: no ISIC2018_Task3_Training_LesionGroupings.csv, so images cannot be grouped by lesion (an "
            "image-level split leaks near-duplicate images of one lesion into the test split); add that file, or "
            "set data.split_by: image (--split-by image) to accept an image-level split")
    if split_by == "image" and lesions is not None:
        raise HamtuneError(f"{root}: split_by 'image' is only for a folder without lesion ids, but {lesions.name} "
                           "is here; drop split_by so that the split groups images by lesion")


def _read_csv(source: Path | IO[bytes], path: Path | str, what: str, header: Sequence[str]) -> pd.DataFrame:
    raw = read_csv_strings(source, f"expected a comma-separated {what} file with header {','.join(header)}", path)
    if raw.empty:
        raise HamtuneError(f"{path}: {what} file has a header but no rows; expected one row per image")
    return raw.apply(lambda col: col.str.strip())


def _check_ids(path: Path, ids: pd.Series, column: str) -> None:
    line = np.arange(len(ids)) + 2  # 1-based file line; line 1 is the header
    empty = (ids == "").to_numpy()
    if empty.any():
        raise HamtuneError(f"{path}: line {line[empty.argmax()]}: {column} is empty; expected an id on every row")
    duplicated = ids.duplicated(keep=False).to_numpy()
    if duplicated.any():
        first = ids.iloc[duplicated.argmax()]
        lines = ", ".join(str(n) for n in line[(ids == first).to_numpy()])
        raise HamtuneError(f"{path}: image_id {first} appears on lines {lines}; expected each image listed once")


def read_ground_truth(source: Path | IO[bytes], where: str | None = None) -> pd.DataFrame:
    """The one-hot ground-truth CSV -> (image_id, dx) in file order, every row checked (one 1 per row).

    source: a path, or an open binary stream (a zip member) that `where` names in messages.
    """
    path = where or source
    raw = _read_csv(source, path, "ISIC 2018 Task 3 ground-truth", ("image",) + ISIC_COLUMNS)
    missing = [c for c in ("image",) + ISIC_COLUMNS if c not in raw.columns]
    if missing:
        raise HamtuneError(f"{path}: missing column(s) {', '.join(missing)}; expected columns "
                           f"image, {', '.join(ISIC_COLUMNS)}")
    _check_ids(path, raw["image"], "image")
    values = raw[list(ISIC_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    valid = np.isin(values, (0.0, 1.0)).all(axis=1) & (values.sum(axis=1) == 1)
    if not valid.all():
        i = int(np.argmin(valid))
        shown = ",".join(raw.loc[i, list(ISIC_COLUMNS)])
        raise HamtuneError(f"{path}: line {i + 2}: expected exactly one 1.0 among {', '.join(ISIC_COLUMNS)}, "
                           f"got {shown}")
    dx = np.array([c.lower() for c in ISIC_COLUMNS])[values.argmax(axis=1)]
    return pd.DataFrame({"image_id": raw["image"].to_numpy(), "dx": dx})


def read_lesion_groupings(path: Path) -> pd.DataFrame:
    """The lesion-groupings CSV -> (image_id, lesion_id, dx_type); the header is matched by name, any case."""
    raw = _read_csv(path, path, "lesion-groupings", LESION_COLUMNS)
    by_lower = {c.lower(): c for c in raw.columns}
    if not all(c in by_lower for c in LESION_COLUMNS):
        raise HamtuneError(f"{path}: header {','.join(raw.columns)} is not a lesion-groupings header; expected "
                           f"columns {', '.join(LESION_COLUMNS)} (any case)")
    table = pd.DataFrame({"image_id": raw[by_lower["image"]], "lesion_id": raw[by_lower["lesion_id"]],
                          "dx_type": raw[by_lower["diagnosis_confirm_type"]].str.lower().replace("", "unknown")})
    _check_ids(path, table["image_id"], "image")
    empty = (table["lesion_id"] == "").to_numpy()
    if empty.any():
        raise HamtuneError(f"{path}: line {empty.argmax() + 2}: lesion_id is empty; expected an id on every row")
    return table


def read_table(files) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ham10000.read_table for this layout: (table with TABLE_COLUMNS + path, problems), same rules and order."""
    path = files.metadata
    truth = read_ground_truth(path)
    if files.lesions is not None:
        groups = read_lesion_groupings(files.lesions)
        table = truth.merge(groups, on="image_id", how="left", validate="one_to_one")
        unmatched = table["lesion_id"].isna().to_numpy()
        if unmatched.any():
            raise HamtuneError(f"{files.lesions}: has no row for image {table['image_id'].iloc[unmatched.argmax()]} "
                               f"of {path.name} ({int(unmatched.sum())} images without one); expected a lesion_id "
                               "for every image")
    else:  # split_by: image, asked for by name (check_split_by): every image is its own group
        table = truth.assign(lesion_id=truth["image_id"], dx_type="unknown")
    table["age"] = np.nan
    table["sex"] = "unknown"
    table["localization"] = "unknown"
    table["label"] = table["dx"].map({code: i for i, code in enumerate(CLASSES)}).astype("int64")

    return pair_with_files(table, files, path, np.arange(len(table)) + 2, id_column="image")


def check_meta_available(root: Path, layout: str) -> None:
    """use_meta needs age, sex and site; this layout has none, and a model fed constant 'unknown' would learn nothing
    from them while seeming to use them."""
    if layout == "isic2018":
        raise HamtuneError(f"{root}: the ISIC 2018 Task 3 layout has no age, sex or site, so model.use_meta cannot be "
                           "used with it; set use_meta: false (and leave it out of space) or use the Kaggle layout")


# ---------------------------------------------------------------------------------------------------------------
# The official challenge's formats


def submission_table(image_ids: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """An ISIC 2018 Task 3 submission: `image` then MEL..VASC probabilities (float64 in [0, 1]), one row per image."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    table = pd.DataFrame({"image": [str(i) for i in image_ids]})
    for column in ISIC_COLUMNS:
        table[column] = probs[:, CLASSES.index(column.lower())]
    return table


def write_submission(path: Path, image_ids: Sequence[str], probs: np.ndarray) -> Path:
    """submission.csv as the official scorer (isic-challenge-scoring classification) reads it, written atomically."""
    return write_csv(path, submission_table(image_ids, probs))


def official_weights(image_ids: Sequence[str], form: str) -> np.ndarray:
    """Score weight per image as the official scorer gives it: 1, except 0 for OFFICIAL_ZERO_WEIGHT in ISIC ground
    truth (its truth loader applies the rule to any ground-truth file that lists that 2018 test image)."""
    ids = np.asarray([str(i) for i in image_ids])
    weights = np.ones(len(ids))
    if form.startswith("ISIC"):
        weights[np.isin(ids, OFFICIAL_ZERO_WEIGHT)] = 0.0
    return weights
