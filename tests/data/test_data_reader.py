"""The validating reader and the prepare path on the real sample and on small, deliberately broken folders."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hamtune.data import encode_meta, load_metadata, prepare
from hamtune.reports.exploration import class_table
from hamtune.data.images import decode_image
from hamtune.reports.exploration import write_exploration_plots
from hamtune.vocab import CLASSES, LOCALIZATIONS, META_DIM, METADATA_COLUMNS, SEXES
from hamtune.errors import HamtuneError

# --- helpers: tiny Kaggle-layout folders -----------------------------------------------------------------------------


def jpeg_bytes(seed: int, size=(40, 30), fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def metadata_row(image_id: str, dx: str, lesion: str | None = None, age="50.0", sex="male", site="back") -> dict:
    return {"lesion_id": lesion or "HAM_" + image_id[5:], "image_id": image_id, "dx": dx, "dx_type": "histo",
            "age": age, "sex": sex, "localization": site}


def write_metadata(root: Path, rows: list[dict], columns=METADATA_COLUMNS) -> Path:
    path = root / "HAM10000_metadata.csv"
    pd.DataFrame(rows).reindex(columns=list(columns)).to_csv(path, index=False)
    return path


def make_folder(root: Path, n: int = 7) -> list[dict]:
    """n valid JPEGs (classes in turn) in part_1/part_2 and their metadata rows."""
    rows = []
    for i in range(n):
        image_id = f"ISIC_{i:07d}"
        folder = root / ("HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{image_id}.jpg").write_bytes(jpeg_bytes(i))
        rows.append(metadata_row(image_id, CLASSES[i % len(CLASSES)]))
    write_metadata(root, rows)
    return rows


# --- real sample -----------------------------------------------------------------------------------------------------


def test_load_metadata_reads_real_sample(sample_dir):
    table, problems = load_metadata(sample_dir)
    assert len(table) == 140 and problems.empty
    assert table["dx"].value_counts().to_dict() == {c: 20 for c in CLASSES}
    assert (table["label"] == table["dx"].map(CLASSES.index)).all()
    csv = pd.read_csv(sample_dir / "HAM10000_metadata.csv").set_index("image_id")
    joined = table.set_index("image_id")
    for column in ("lesion_id", "dx", "age", "sex", "localization"):
        assert (joined[column] == csv.loc[joined.index, column]).all(), column
    assert all(Path(p).stem == i and Path(p).is_file() for i, p in zip(table["image_id"], table["path"]))
    folders = {Path(p).parent.name for p in table["path"]}
    assert folders == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


@pytest.mark.parametrize("size", [24, 64])
def test_prepare_real_sample_decodes_both_resolutions(sample_dir, tmp_path, size):
    data = prepare(sample_dir, size, cache_dir=tmp_path, progress=False)
    assert data.images.shape == (140, size, size, 3) and data.images.dtype == np.uint8
    assert data.decoded == 140 and data.problems.empty
    assert list(data.table.columns) == ["image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex",
                                        "localization", "split"]
    table, _ = load_metadata(sample_dir)
    by_folder = table.groupby(table["path"].map(lambda p: Path(p).parent.name))
    for folder, expected_size in (("HAM10000_images_part_1", (600, 450)), ("HAM10000_images_part_2", (200, 150))):
        row = by_folder.get_group(folder).iloc[0]
        with Image.open(row["path"]) as original:
            assert original.size == expected_size
            # independent reference: full decode, short side to `size`, centre crop
            reference = original.convert("RGB").resize((round(size * 4 / 3), size), Image.Resampling.LANCZOS)
        left = (reference.width - size) // 2
        reference = np.asarray(reference.crop((left, 0, left + size, size)), dtype=np.float32)
        index = int(np.flatnonzero(data.table["image_id"] == row["image_id"])[0])
        decoded = data.images[index].astype(np.float32)
        assert decoded.std() > 10  # a real photo, not a blank
        assert np.abs(decoded - reference).mean() < 6, folder  # draft-mode decode matches a full decode
        assert data.table["dx"].iat[index] == row["dx"] and data.table["label"].iat[index] == CLASSES.index(row["dx"])


def test_encode_meta_layout(sample_dir):
    table = pd.DataFrame({"age": [80.0, None, 35.0], "sex": ["male", None, "other"],
                          "localization": ["back", "nowhere", None]})
    meta = encode_meta(table)
    assert meta.shape == (3, META_DIM) and meta.dtype == np.float32
    assert meta[:, 0].tolist() == pytest.approx([0.8, 0.5, 0.35])
    sex, site = meta[:, 1:1 + len(SEXES)], meta[:, 1 + len(SEXES):]
    assert sex.argmax(1).tolist() == [SEXES.index("male"), SEXES.index("unknown"), SEXES.index("unknown")]
    assert site.argmax(1).tolist() == [LOCALIZATIONS.index("back")] + [LOCALIZATIONS.index("unknown")] * 2
    assert (meta[:, 1:].sum(1) == 2).all()  # exactly one sex and one site


def test_class_table_and_plots(sample_dir, tmp_path):
    data = prepare(sample_dir, 16, cache_dir=tmp_path / "cache", progress=False)
    counts = class_table(data)
    assert list(counts["dx"]) == list(CLASSES)
    assert (counts["total"] == 20).all() and (counts[["train", "val", "test"]].sum(axis=1) == 20).all()
    assert counts["val_lesions"].tolist() == counts["val"].tolist()  # one image per lesion in the sample
    written = write_exploration_plots(data, tmp_path / "plots")
    assert [p.name for p in written] == ["class_counts.png", "age_by_dx.png", "sex_by_dx.png", "site_by_dx.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left behind


# --- fatal input errors ----------------------------------------------------------------------------------------------


def test_nonexistent_folder(tmp_path):
    with pytest.raises(HamtuneError, match="does not exist"):
        load_metadata(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "file.csv").write_text("x")
    with pytest.raises(HamtuneError, match="is a file"):
        load_metadata(tmp_path / "file.csv")


def test_empty_folder(tmp_path):
    with pytest.raises(HamtuneError, match="is empty"):
        load_metadata(tmp_path)


def test_folder_without_images(tmp_path):
    write_metadata(tmp_path, [metadata_row("ISIC_0000001", "nv")])
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(HamtuneError, match=r"no \.jpg/\.jpeg/\.png image files"):
        load_metadata(tmp_path)


def test_folder_without_metadata(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "HAM10000_metadata.csv").unlink()
    with pytest.raises(HamtuneError, match="no metadata file HAM10000_metadata.csv"):
        load_metadata(tmp_path)


def test_missing_columns_are_named(tmp_path):
    rows = make_folder(tmp_path)
    write_metadata(tmp_path, rows, columns=[c for c in METADATA_COLUMNS if c not in ("dx", "age")])
    with pytest.raises(HamtuneError, match="missing column.*dx, age") as error:
        load_metadata(tmp_path)
    assert "HAM10000_metadata.csv" in str(error.value) and "\n" not in str(error.value)


def test_unknown_dx_names_line_value_and_allowed_codes(tmp_path):
    rows = make_folder(tmp_path)
    rows[2]["dx"] = "melanoma"
    write_metadata(tmp_path, rows)
    with pytest.raises(HamtuneError, match=r"line 4: dx 'melanoma' .*akiec, bcc, bkl, df, mel, nv, vasc"):
        load_metadata(tmp_path)


def test_duplicate_image_id_names_id_and_lines(tmp_path):
    rows = make_folder(tmp_path)
    rows[5]["image_id"] = rows[1]["image_id"]
    write_metadata(tmp_path, rows)
    with pytest.raises(HamtuneError, match=r"image_id ISIC_0000001 appears on lines 3, 7"):
        load_metadata(tmp_path)


def test_non_numeric_age(tmp_path):
    rows = make_folder(tmp_path)
    rows[0]["age"] = "old"
    write_metadata(tmp_path, rows)
    with pytest.raises(HamtuneError, match=r"line 2: age 'old' is not a number"):
        load_metadata(tmp_path)


def test_same_image_id_with_different_files_is_ambiguous(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "ISIC_0000003.jpg").write_bytes(jpeg_bytes(99, size=(50, 40)))
    with pytest.raises(HamtuneError, match="ISIC_0000003 has two different files"):
        load_metadata(tmp_path)


def test_kaggle_duplicate_folders_count_once(tmp_path):
    make_folder(tmp_path)
    copy = tmp_path / "ham10000_images_part_1"  # Kaggle ships a lower-case copy of each part
    copy.mkdir()
    for path in (tmp_path / "HAM10000_images_part_1").iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    table, problems = load_metadata(tmp_path)
    assert len(table) == 7 and problems.empty


# --- skipped items: warned, listed, fatal only with strict -----------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """7 good JPEGs plus: PNG, upper-case .JPG and .jpeg (all valid); a truncated JPEG; a text file named .jpg;
    a metadata row without a file; a file without a row; a .txt file that must be ignored."""
    root = tmp_path / "messy"
    rows = make_folder(root)
    extra = root / "HAM10000_images_part_2" / "nested"
    extra.mkdir()
    (extra / "ISIC_0000100.png").write_bytes(jpeg_bytes(100, fmt="PNG"))
    (root / "HAM10000_images_part_1" / "ISIC_0000101.JPG").write_bytes(jpeg_bytes(101))
    (root / "HAM10000_images_part_1" / "ISIC_0000102.jpeg").write_bytes(jpeg_bytes(102))
    whole = jpeg_bytes(103, size=(120, 90))
    (root / "HAM10000_images_part_1" / "ISIC_0000103.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "HAM10000_images_part_1" / "ISIC_0000104.jpg").write_text("this is not a JPEG")
    (root / "HAM10000_images_part_1" / "ISIC_0000105.jpg").write_bytes(jpeg_bytes(105))  # no metadata row
    (root / "HAM10000_images_part_1" / "README.txt").write_text("ignored")
    (root / "ISIC_0000107.gif").write_bytes(b"GIF89a")  # not a kept suffix: ignored too
    rows += [metadata_row(f"ISIC_{i:07d}", "mel") for i in (100, 101, 102, 103, 104, 106)]  # 106: no file
    write_metadata(root, rows)
    return root


def test_truncated_jpeg_fails_to_decode(messy_folder):
    with pytest.raises(OSError, match="truncated"):
        decode_image(messy_folder / "HAM10000_images_part_1" / "ISIC_0000103.jpg", 16)


def test_problems_are_skipped_listed_and_warned_once(messy_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hamtune.data"):
        data = prepare(messy_folder, 16, cache_dir=tmp_path / "cache", progress=False)
    kept = set(data.table["image_id"])
    assert kept == {f"ISIC_{i:07d}" for i in (*range(7), 100, 101, 102)}  # PNG, .JPG, .jpeg read; bad ones out
    assert len(data.images) == len(data.table) == 10
    assert data.decoded == 12  # 10 good + the 2 unreadable attempts
    problems = data.problems.set_index("image_id")["kind"].to_dict()
    assert problems == {"ISIC_0000106": "missing_image", "ISIC_0000105": "unlisted_image",
                        "ISIC_0000103": "unreadable_image", "ISIC_0000104": "unreadable_image"}
    detail = data.problems.set_index("image_id")["detail"]
    assert "truncated" in detail["ISIC_0000103"] and "UnidentifiedImageError" in detail["ISIC_0000104"]
    on_disk = pd.read_csv(data.path / "problems.csv")
    assert sorted(on_disk["image_id"]) == sorted(problems)
    warnings = [r for r in caplog.records if r.name == "hamtune.data"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "1 metadata rows without an image file, 1 image files without a metadata row, 2 unreadable" in (
        warnings[0].getMessage())
    # the PNG decoded to the same pixels as decoding it directly
    index = int(np.flatnonzero(data.table["image_id"] == "ISIC_0000100")[0])
    png = messy_folder / "HAM10000_images_part_2" / "nested" / "ISIC_0000100.png"
    assert np.array_equal(data.images[index], decode_image(png, 16))


def test_strict_fails_on_unpaired_rows_and_files(messy_folder, tmp_path):
    with pytest.raises(HamtuneError, match="strict mode: 1 metadata rows without an image file, 1 image files"):
        prepare(messy_folder, 16, cache_dir=tmp_path / "cache", strict=True, progress=False)


def test_strict_fails_on_unreadable_images(messy_folder, tmp_path):
    (messy_folder / "HAM10000_images_part_1" / "ISIC_0000105.jpg").unlink()
    table = pd.read_csv(messy_folder / "HAM10000_metadata.csv")
    write_metadata(messy_folder, table[table["image_id"] != "ISIC_0000106"].to_dict("records"))
    with pytest.raises(HamtuneError, match="strict mode: 0 metadata rows .* 2 unreadable images"):
        prepare(messy_folder, 16, cache_dir=tmp_path / "cache", strict=True, progress=False)
    # the same folder without strict goes on, reusing the decoded entry; strict still refuses it
    data = prepare(messy_folder, 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(data.table) == 10 and data.decoded == 0
    with pytest.raises(HamtuneError, match="2 unreadable images"):
        prepare(messy_folder, 16, cache_dir=tmp_path / "cache", strict=True, progress=False)


def test_clean_folder_passes_strict(tmp_path):
    make_folder(tmp_path / "clean")
    data = prepare(tmp_path / "clean", 16, cache_dir=tmp_path / "cache", strict=True, progress=False)
    assert len(data.table) == 7 and data.problems.empty


def test_metadata_with_byte_order_mark_and_spaces(tmp_path):
    rows = make_folder(tmp_path)
    path = write_metadata(tmp_path, rows)
    text = path.read_text().replace(",nv,", ", NV ,")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as saved by Excel
    table, problems = load_metadata(tmp_path)
    assert len(table) == 7 and problems.empty and "nv" in set(table["dx"])
