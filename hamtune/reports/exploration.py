"""Look at a prepared dataset before searching on it: a per-class table and four plots of the class and
demographic make-up per split (the things that decide whether balanced accuracy, lesion grouping and metadata
features matter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from hamtune.data.split import SPLITS
from hamtune.io import save_figure
from hamtune.reports.plots import figure
from hamtune.vocab import CLASSES, DIAGNOSES

_SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def class_table(prepared) -> pd.DataFrame:
    """One row per class (dx code, diagnosis): images per split, total images, lesions per split."""
    table = prepared.table
    dx = pd.Categorical(table["dx"], categories=CLASSES)
    images = pd.crosstab(dx, table["split"], dropna=False).reindex(index=CLASSES, columns=SPLITS, fill_value=0)
    lesions = (
        table.assign(dx=dx).groupby(["dx", "split"], observed=False)["lesion_id"].nunique()
        .unstack("split").reindex(index=CLASSES, columns=SPLITS).fillna(0).astype(int)
    )
    out = pd.DataFrame({"dx": list(CLASSES), "diagnosis": [DIAGNOSES[c] for c in CLASSES]})
    for name in SPLITS:
        out[name] = images[name].to_numpy()
    out["total"] = images.sum(axis=1).to_numpy()
    for name in SPLITS:
        out[f"{name}_lesions"] = lesions[name].to_numpy()
    return out


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=120, tight=True)


def _stacked_bars(ax, counts: pd.DataFrame, colours=None, horizontal: bool = False) -> None:
    """counts: rows = bars, columns = stacked parts."""
    bottom = np.zeros(len(counts))
    positions = np.arange(len(counts))
    for i, column in enumerate(counts.columns):
        values = counts[column].to_numpy(dtype=float)
        colour = colours[column] if colours else None
        if horizontal:
            ax.barh(positions, values, left=bottom, label=str(column), color=colour)
        else:
            ax.bar(positions, values, bottom=bottom, label=str(column), color=colour)
        bottom += values
    if horizontal:
        ax.set_yticks(positions, counts.index)
    else:
        ax.set_xticks(positions, counts.index)


def write_exploration_plots(prepared, out_dir: str | Path) -> list[Path]:
    """Write class_counts.png, age_by_dx.png, sex_by_dx.png, site_by_dx.png into out_dir; return their paths.

    The metadata figures are left out where the data has no such metadata (the ISIC 2018 Task 3 layout)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = prepared.table
    dx = pd.Categorical(table["dx"], categories=CLASSES)
    written = []

    fig = figure((7, 4))
    ax = fig.subplots()
    counts = pd.crosstab(dx, table["split"], dropna=False).reindex(index=CLASSES, columns=SPLITS, fill_value=0)
    _stacked_bars(ax, counts, _SPLIT_COLOURS)
    for x, total in enumerate(counts.sum(axis=1)):
        ax.annotate(str(total), (x, total), ha="center", va="bottom", fontsize=8)
    ax.set(title=f"Images per diagnosis ({len(table)} images)", xlabel="diagnosis", ylabel="images")
    ax.set_ylim(0, max(1, counts.to_numpy().sum(axis=1).max()) * 1.12)  # room for the totals
    ax.legend(title="split", loc="upper left")
    written.append(_save(fig, out_dir / "class_counts.png"))

    ages = [table.loc[table["dx"] == c, "age"].dropna().to_numpy() for c in CLASSES]
    present = [i for i, a in enumerate(ages) if len(a)]
    if present:  # the ISIC 2018 Task 3 layout has no ages, sexes or sites: no figure of them
        fig = figure((7, 4))
        ax = fig.subplots()
        ax.boxplot([ages[i] for i in present], positions=present, widths=0.6)
        ax.set_xticks(range(len(CLASSES)), CLASSES)
        ax.set(title="Age by diagnosis", xlabel="diagnosis", ylabel="age (years)")
        written.append(_save(fig, out_dir / "age_by_dx.png"))

    for column, name, title in (("sex", "sex_by_dx.png", "Sex by diagnosis"),
                                ("localization", "site_by_dx.png", "Body site by diagnosis")):
        if set(table[column]) <= {"unknown"}:
            continue
        fig = figure((8 if column == "localization" else 7, 4.5))
        ax = fig.subplots()
        counts = pd.crosstab(dx, table[column], dropna=False).reindex(index=CLASSES, fill_value=0)
        fractions = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
        colours = None
        if column == "localization":
            cmap = colormaps["tab20"]  # 15 body sites: the default 10-colour cycle would repeat
            colours = {c: cmap(i % 20) for i, c in enumerate(fractions.columns)}
        _stacked_bars(ax, fractions, colours)
        ax.set(title=f"{title} (fraction of images)", xlabel="diagnosis", ylabel="fraction")
        ax.set_ylim(0, 1)
        ax.legend(title=column, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
        written.append(_save(fig, out_dir / name))
    return written
