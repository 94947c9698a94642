"""The one decoder's limits: an image is refused from its header, before a pixel is decoded, above
MAX_IMAGE_PIXELS or under MIN_IMAGE_SIDE, in every path (the decoder itself, `prepare`, the `predict` CLI), in one
line and without Pillow's DecompressionBombWarning; and an output file that does not fit the disk's reserved space
fails in create_npy, not with SIGBUS in a worker.

The crafted PNGs are real PNG files (signature, IHDR, zlib IDAT, IEND) of 1-bit grey: a 100-megapixel one is 12 kB.
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hamtune.data import prepare
from hamtune.data.images import (
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageRefused,
    decode_image,
)
from hamtune.vocab import METADATA_COLUMNS

from image_fixtures import png_declaring

REPO = Path(__file__).resolve().parents[2]


REFUSED = {  # name: (PNG bytes, kind, words of the message)
    "50 megapixels (over ours, under Pillow's warning)": (png_declaring(10_000, 5_000), "too_large",
                                                          "10000x5000 pixels; at most 40 megapixels"),
    "100 megapixels (Pillow would warn)": (png_declaring(10_000, 10_000), "too_large", "10000x10000 pixels"),
    "10 gigapixels declared in 92 bytes (Pillow refuses)": (png_declaring(100_000, 100_000, rows=1), "too_large",
                                                            "10,000 megapixels; at most 40"),
    "1x1": (png_declaring(1, 1), "too_small", "1x1 pixels; expected at least 8"),
    "4x600": (png_declaring(4, 600), "too_small", "4x600 pixels"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_the_decoder_refuses_from_the_header_without_a_warning(name):
    data, kind, words = REFUSED[name]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ImageRefused) as refused:
            decode_image(io.BytesIO(data), 16)
    assert refused.value.kind == kind and words in str(refused.value) and "\n" not in str(refused.value)
    assert not shown, [str(w.message) for w in shown]


def test_the_refusal_comes_before_decoding():
    """A 50-megapixel PNG cut in half: decoding it would fail as truncated, so an ImageRefused proves the pixels were
    never read; the same cut at a legal size does fail as truncated."""
    cut = png_declaring(10_000, 5_000)
    with pytest.raises(ImageRefused, match="10000x5000 pixels"):
        decode_image(io.BytesIO(cut[: len(cut) // 2]), 16)
    legal = png_declaring(5_000, 5_000)
    with pytest.raises(OSError, match="truncated"):
        decode_image(io.BytesIO(legal[: len(legal) // 2]), 16)


def test_limits_are_the_edges_they_say():
    """The largest and smallest accepted images decode (to the requested square)."""
    side = MIN_IMAGE_SIDE
    assert decode_image(io.BytesIO(png_declaring(side, side)), 16).shape == (16, 16, 3)
    wide = MAX_IMAGE_PIXELS // 1000
    assert decode_image(io.BytesIO(png_declaring(wide, 1000)), 16).shape == (16, 16, 3)
    with pytest.raises(ImageRefused):
        decode_image(io.BytesIO(png_declaring(wide + 1, 1000)), 16)


def _jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def test_prepare_skips_refused_images_and_lists_why(tmp_path, caplog):
    """In the training path the refused files become problems.csv rows with the reason, and one warning line."""
    root = tmp_path / "ham"
    images = root / "HAM10000_images_part_1"
    images.mkdir(parents=True)
    rows = []
    for i in range(12):
        _jpeg(images / f"ISIC_{i:07d}.jpg", i)
        rows.append({"lesion_id": f"HAM_{i:07d}", "image_id": f"ISIC_{i:07d}", "dx": "nv", "dx_type": "histo",
                     "age": "50.0", "sex": "male", "localization": "back"})
    (images / "ISIC_0000100.png").write_bytes(png_declaring(100_000, 100_000, rows=1))
    (images / "ISIC_0000101.png").write_bytes(png_declaring(1, 1))
    rows += [{**rows[0], "lesion_id": f"HAM_{i:07d}", "image_id": f"ISIC_{i:07d}"} for i in (100, 101)]
    pd.DataFrame(rows).reindex(columns=list(METADATA_COLUMNS)).to_csv(root / "HAM10000_metadata.csv", index=False)
    with caplog.at_level("WARNING", logger="hamtune.data"):
        data = prepare(root, 16, cache_dir=tmp_path / "cache", progress=False, workers=1)
    detail = data.problems.set_index("image_id")["detail"]
    assert len(data.table) == 12 and set(detail.index) == {"ISIC_0000100", "ISIC_0000101"}
    assert "10,000 megapixels; at most 40 megapixels accepted" in detail["ISIC_0000100"]
    assert "1x1 pixels; expected at least 8 pixels on each side" in detail["ISIC_0000101"]
    assert len([r for r in caplog.records if r.name == "hamtune.data"]) == 1


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from model_fixtures import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("images-model") / "model.pt")


def test_predict_cli_refuses_huge_and_degenerate_images_in_one_line_each(model_file, tmp_path):
    """Through the real CLI: beside a good image, each refused one is one `skipped` line and the good one is
    answered; alone, a 100-megapixel PNG (Pillow's warning zone) is one error line and exit 2, no warning."""
    good, huge, tiny, bomb = (tmp_path / n for n in ("good.jpg", "huge.png", "tiny.png", "bomb.png"))
    _jpeg(good, 0)
    huge.write_bytes(png_declaring(10_000, 10_000))
    tiny.write_bytes(png_declaring(1, 1))
    bomb.write_bytes(png_declaring(100_000, 100_000, rows=1))
    cli = [sys.executable, "-m", "hamtune.cli", "predict", "--model", str(model_file)]
    mixed = subprocess.run([*cli, str(good), str(huge), str(tiny), str(bomb)], cwd=REPO, capture_output=True,
                           text=True, timeout=600, check=False)
    assert mixed.returncode == 0, mixed.stderr
    skipped = mixed.stderr.strip().splitlines()
    assert len(skipped) == 3 and all(line.startswith("skipped ") for line in skipped), mixed.stderr
    assert any(str(huge) in line and "10000x10000 pixels; at most 40 megapixels" in line for line in skipped)
    assert any(str(tiny) in line and "1x1 pixels" in line for line in skipped)
    assert any(str(bomb) in line and "10,000 megapixels" in line for line in skipped)
    assert "good" in mixed.stdout and "huge" not in mixed.stdout

    alone = subprocess.run([*cli, str(huge)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    lines = alone.stderr.strip().splitlines()
    assert alone.returncode == 2 and alone.stdout == ""
    # predict says `skipped` for the file, then the one error line (hamtune.final.inference decides the first)
    assert lines[-1].startswith("hamtune: error: ") and str(huge) in lines[-1], alone.stderr
    assert "10000x10000 pixels; at most 40 megapixels" in lines[-1]
    assert len(lines) <= 2 and all(str(huge) in line for line in lines), alone.stderr
    assert "DecompressionBomb" not in alone.stderr and "Traceback" not in alone.stderr
