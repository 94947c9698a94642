"""A synthetic stand-in for HAM10000, written in the Kaggle layout so it goes through the same reader and JPEG decoder.

Why it looks the way it does: the search has to be exercised on data with HAM10000's shape of difficulty, not on
noise and not on a trivially separable toy. So the generator copies the class imbalance (nv ~67%, df ~1%), the
~1.34 images per lesion (images of one lesion are near-duplicates: same lesion parameters, new pose, lighting and
hair), demographics that depend on the diagnosis, and class-dependent colour, size, shape, border irregularity and
texture. A third of the lesions borrow much of their appearance from a commonly confused class (mel/nv/bkl,
bcc/akiec, df/nv, vasc/bcc), so a small CNN beats chance clearly but stays far from perfect, and a model that ignores
the imbalance loses the minority classes. Checked once (6,000 images, 32 px, 15 epochs of a 3-conv CNN, val+test):
balanced accuracy 0.53 with plain cross-entropy (dermatofibroma recall 0.0) and 0.67 with class weights; logistic
regression on raw pixels 0.35 and 0.54. Chance is 0.14.

Every lesion and every image draws from its own seeded generator, so the output bytes depend only on (n, seed, size),
not on the number of worker processes.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from hamtune.data.ham10000 import METADATA_FILE
from hamtune.data.workers import cpu_count, process_pool
from hamtune.errors import HamtuneError
from hamtune.vocab import CLASSES, HAM10000_FREQUENCIES, LOCALIZATIONS, METADATA_COLUMNS

SYNTHETIC_VERSION = 1  # bump when the images or metadata a seed produces change
DEFAULT_IMAGE_SIZE = (112, 84)  # (width, height), 4:3 like the 600x450 originals
IMAGES_PER_LESION = 1.34
JPEG_QUALITY = 90
_FIRST_IMAGE_NUMBER = 24306  # ISIC_0024306 is the first image of the real release
_PARALLEL_MIN_IMAGES = 1500  # below this, starting worker processes costs more than it saves

# --- Appearance: one row of parameters per lesion ----------------------------------------------------------------
# Each class gives (mean, sd) per parameter; a lesion draws from its class (or a blend with a confused class).
PARAMS = (
    "r", "g", "b",            # lesion base colour (0..1)
    "radius",                 # lesion radius as a fraction of image height
    "eccentricity",           # ellipse stretch
    "irregularity",           # border harmonic amplitude
    "softness",               # edge blur relative to radius
    "texture",                # amplitude of the mottled texture
    "texture_cells",          # texture grain: number of noise cells across the image (higher = finer)
    "blotch",                 # amount of the secondary (blue-grey) colour
    "centre_patch",           # pale central patch (dermatofibroma)
    "dots",                   # red dots / lacunae / vessels
    "asymmetry",              # off-centre darkening
)
_P = {name: i for i, name in enumerate(PARAMS)}
_PROFILES = {  # mean, sd
    "akiec": dict(r=(0.80, 0.03), g=(0.52, 0.03), b=(0.48, 0.03), radius=(0.30, 0.08), eccentricity=(0.25, 0.12),
                  irregularity=(0.09, 0.04), softness=(0.30, 0.10), texture=(0.12, 0.05), texture_cells=(14, 4),
                  blotch=(0.05, 0.05), centre_patch=(0.05, 0.05), dots=(0.25, 0.15), asymmetry=(0.20, 0.12)),
    "bcc": dict(r=(0.78, 0.03), g=(0.58, 0.03), b=(0.58, 0.03), radius=(0.27, 0.08), eccentricity=(0.20, 0.10),
                irregularity=(0.07, 0.04), softness=(0.18, 0.08), texture=(0.08, 0.04), texture_cells=(8, 3),
                blotch=(0.35, 0.15), centre_patch=(0.08, 0.06), dots=(0.35, 0.15), asymmetry=(0.20, 0.12)),
    "bkl": dict(r=(0.68, 0.03), g=(0.52, 0.03), b=(0.42, 0.03), radius=(0.33, 0.08), eccentricity=(0.25, 0.12),
                irregularity=(0.08, 0.04), softness=(0.10, 0.05), texture=(0.15, 0.05), texture_cells=(20, 5),
                blotch=(0.08, 0.06), centre_patch=(0.05, 0.05), dots=(0.05, 0.05), asymmetry=(0.25, 0.12)),
    "df": dict(r=(0.65, 0.03), g=(0.45, 0.03), b=(0.38, 0.03), radius=(0.21, 0.05), eccentricity=(0.15, 0.08),
               irregularity=(0.04, 0.02), softness=(0.25, 0.08), texture=(0.05, 0.03), texture_cells=(8, 3),
               blotch=(0.03, 0.03), centre_patch=(0.55, 0.20), dots=(0.03, 0.03), asymmetry=(0.10, 0.08)),
    "mel": dict(r=(0.33, 0.03), g=(0.22, 0.03), b=(0.22, 0.03), radius=(0.36, 0.09), eccentricity=(0.30, 0.14),
                irregularity=(0.14, 0.05), softness=(0.10, 0.05), texture=(0.14, 0.05), texture_cells=(7, 3),
                blotch=(0.40, 0.18), centre_patch=(0.05, 0.05), dots=(0.08, 0.07), asymmetry=(0.45, 0.18)),
    "nv": dict(r=(0.55, 0.03), g=(0.34, 0.03), b=(0.28, 0.03), radius=(0.27, 0.07), eccentricity=(0.15, 0.08),
               irregularity=(0.04, 0.02), softness=(0.10, 0.04), texture=(0.06, 0.03), texture_cells=(8, 3),
               blotch=(0.06, 0.06), centre_patch=(0.06, 0.06), dots=(0.03, 0.03), asymmetry=(0.12, 0.08)),
    "vasc": dict(r=(0.68, 0.03), g=(0.22, 0.03), b=(0.32, 0.03), radius=(0.22, 0.06), eccentricity=(0.20, 0.10),
                 irregularity=(0.05, 0.03), softness=(0.08, 0.04), texture=(0.06, 0.03), texture_cells=(6, 2),
                 blotch=(0.10, 0.08), centre_patch=(0.03, 0.03), dots=(0.60, 0.20), asymmetry=(0.15, 0.10)),
}
_MEAN = np.array([[_PROFILES[c][p][0] for p in PARAMS] for c in CLASSES])
_SD = np.array([[_PROFILES[c][p][1] for p in PARAMS] for c in CLASSES])
_CONFUSE_PROBABILITY = 0.35
_CONFUSED_WITH = {  # class -> {look-alike class: weight}
    "akiec": {"bcc": 0.5, "bkl": 0.5},
    "bcc": {"akiec": 0.4, "nv": 0.3, "vasc": 0.3},
    "bkl": {"mel": 0.5, "nv": 0.4, "akiec": 0.1},
    "df": {"nv": 0.6, "bkl": 0.4},
    "mel": {"nv": 0.6, "bkl": 0.4},
    "nv": {"mel": 0.5, "bkl": 0.4, "df": 0.1},
    "vasc": {"bcc": 0.5, "nv": 0.5},
}

# --- Demographics per class: age (mean, sd), P(male), body site weights, dx_type weights ---------------------------
_AGE = {"akiec": (67, 11), "bcc": (66, 12), "bkl": (62, 13), "df": (52, 14), "mel": (60, 14), "nv": (44, 16),
        "vasc": (48, 20)}
_MALE = {"akiec": 0.66, "bcc": 0.61, "bkl": 0.57, "df": 0.45, "mel": 0.60, "nv": 0.51, "vasc": 0.46}
_SITES = {
    "akiec": {"face": 45, "upper extremity": 12, "lower extremity": 8, "scalp": 9, "neck": 5, "hand": 6, "back": 5,
              "chest": 4, "ear": 3, "trunk": 3},
    "bcc": {"back": 30, "face": 20, "lower extremity": 10, "upper extremity": 10, "chest": 8, "trunk": 5, "neck": 5,
            "abdomen": 4, "scalp": 4, "ear": 2, "hand": 2},
    "bkl": {"face": 25, "back": 20, "lower extremity": 12, "trunk": 10, "upper extremity": 10, "chest": 8,
            "abdomen": 5, "neck": 4, "scalp": 3, "hand": 2, "unknown": 1},
    "df": {"lower extremity": 60, "upper extremity": 20, "trunk": 8, "back": 5, "abdomen": 3, "chest": 2, "foot": 2},
    "mel": {"back": 25, "lower extremity": 20, "upper extremity": 15, "face": 12, "trunk": 8, "chest": 6,
            "abdomen": 5, "neck": 3, "scalp": 3, "foot": 1, "ear": 1, "hand": 1},
    "nv": {"back": 25, "lower extremity": 22, "trunk": 16, "abdomen": 12, "upper extremity": 10, "chest": 4,
           "foot": 3, "face": 2, "neck": 1, "genital": 1, "hand": 1, "acral": 1, "unknown": 2},
    "vasc": {"lower extremity": 30, "trunk": 20, "abdomen": 12, "back": 10, "upper extremity": 10, "face": 8,
             "chest": 5, "genital": 3, "neck": 2},
}
assert all(site in LOCALIZATIONS for sites in _SITES.values() for site in sites)
_DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
_DX_TYPE_WEIGHTS = {"akiec": (1, 0, 0, 0), "bcc": (1, 0, 0, 0), "bkl": (0.5, 0, 0.3, 0.2), "df": (0.5, 0, 0.5, 0),
                    "mel": (1, 0, 0, 0), "nv": (0.35, 0.5, 0.15, 0), "vasc": (0.6, 0, 0.4, 0)}


def class_counts(n_images: int) -> dict[str, int]:
    """Images per class for n_images, proportional to HAM10000_FREQUENCIES (largest-remainder rounding)."""
    weights = np.array([HAM10000_FREQUENCIES[c] for c in CLASSES])
    exact = weights / weights.sum() * n_images
    counts = np.floor(exact).astype(int)
    remainders = exact - counts
    for i in np.argsort(-remainders, kind="stable")[: n_images - counts.sum()]:
        counts[i] += 1
    return dict(zip(CLASSES, counts.tolist()))


def plan_dataset(n_images: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata rows (one per image, METADATA_COLUMNS plus `lesion` = row of the lesion parameters) and the
    (lesions, len(PARAMS)) appearance parameters. Deterministic for (n_images, seed)."""
    rng = np.random.default_rng([seed, 0])
    lesion_dx: list[int] = []
    lesion_sizes: list[np.ndarray] = []
    for k, (code, n) in enumerate(class_counts(n_images).items()):
        if n == 0:
            continue
        lesions = max(1, min(n, round(n / IMAGES_PER_LESION)))
        sizes = np.ones(lesions, dtype=int)
        # extra images go to random lesions, a few lesions get several (like follow-up series)
        np.add.at(sizes, rng.integers(0, lesions, size=n - lesions), 1)
        lesion_dx += [k] * lesions
        lesion_sizes.append(sizes)
    lesion_dx_arr = np.array(lesion_dx)
    sizes = np.concatenate(lesion_sizes)
    n_lesions = len(lesion_dx_arr)

    params = np.stack([_lesion_params(int(k), np.random.default_rng([seed, 1, j]))
                       for j, k in enumerate(lesion_dx_arr)])

    codes = [CLASSES[k] for k in lesion_dx_arr]
    ages = np.array([rng.normal(*_AGE[c]) for c in codes])
    ages = np.clip(np.round(ages / 5) * 5, 0, 85).astype(float)
    ages[rng.random(n_lesions) < 0.006] = np.nan
    sex = np.where(rng.random(n_lesions) < np.array([_MALE[c] for c in codes]), "male", "female").astype(object)
    sex[rng.random(n_lesions) < 0.005] = "unknown"
    site = [_weighted_choice(rng, _SITES[c]) for c in codes]
    dx_type = [_DX_TYPES[rng.choice(4, p=np.array(_DX_TYPE_WEIGHTS[c]) / sum(_DX_TYPE_WEIGHTS[c]))] for c in codes]
    lesion_numbers = rng.choice(np.arange(1, 10 * n_lesions + 10), size=n_lesions, replace=False)

    lesion_of_image = np.repeat(np.arange(n_lesions), sizes)
    image_numbers = _FIRST_IMAGE_NUMBER + rng.permutation(len(lesion_of_image))
    table = pd.DataFrame({
        "lesion_id": [f"HAM_{lesion_numbers[j]:07d}" for j in lesion_of_image],
        "image_id": [f"ISIC_{n:07d}" for n in image_numbers],
        "dx": [codes[j] for j in lesion_of_image],
        "dx_type": [dx_type[j] for j in lesion_of_image],
        "age": ages[lesion_of_image],
        "sex": sex[lesion_of_image],
        "localization": [site[j] for j in lesion_of_image],
        "lesion": lesion_of_image,
    })
    table = table.sort_values(["lesion_id", "image_id"], kind="stable").reset_index(drop=True)
    return table, params


def _weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[name] for name in names], dtype=float)
    return names[rng.choice(len(names), p=p / p.sum())]


def _lesion_params(k: int, rng: np.random.Generator) -> np.ndarray:
    """Appearance of one lesion of class k: its class profile, blended with a look-alike class for some lesions."""
    own = rng.normal(_MEAN[k], _SD[k])
    if rng.random() < _CONFUSE_PROBABILITY:
        partners = _CONFUSED_WITH[CLASSES[k]]
        names = list(partners)
        weights = np.array([partners[n] for n in names])
        other = CLASSES.index(names[rng.choice(len(names), p=weights / weights.sum())])
        t = rng.uniform(0.35, 0.8)
        own = (1 - t) * own + t * rng.normal(_MEAN[other], _SD[other])
    own[[_P["r"], _P["g"], _P["b"]]] *= rng.lognormal(0, 0.18)  # lighter/darker, same hue: blurs colour classes
    return own


# --- Drawing ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of image height, origin at the image centre (float32, shared: never written)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x = (x - (width - 1) / 2) / height
    y = (y - (height - 1) / 2) / height
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance value noise with about `cells` blobs across the image width."""
    gw = int(np.clip(round(cells), 2, width)) + 1
    gh = max(2, round(gw * height / width)) + 1
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    ys = np.linspace(0, gh - 1.001, height, dtype=np.float32)
    xs = np.linspace(0, gw - 1.001, width, dtype=np.float32)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = ys - y0, xs - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]  # smoothstep: no grid creases
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _mix(base: np.ndarray, colour, weight: np.ndarray) -> np.ndarray:
    """Blend an RGB colour into an (H, W, 3) image with per-pixel weight (H, W)."""
    w = weight[..., None]
    return base * (1 - w) + np.asarray(colour, dtype=np.float32) * w


def render_image(params: np.ndarray, lesion_seed: list[int], rng: np.random.Generator,
                 size: tuple[int, int]) -> np.ndarray:
    """One photo of a lesion: uint8 (H, W, 3). `lesion_seed` fixes the outline shared by all photos of the lesion;
    `rng` supplies what changes between photos (pose, lighting, hairs, noise). float32 whole-image numpy ops only."""
    width, height = size
    p = {name: float(value) for name, value in zip(PARAMS, params)}
    x, y = _grid(width, height)
    shape_rng = np.random.default_rng(lesion_seed)
    lesion_radius = min(max(p["radius"], 0.08), 0.48)

    # pose: the lesion's own orientation and place, jittered a little per photo
    cx, cy = shape_rng.normal(0, 0.05, size=2) + rng.normal(0, 0.02, size=2)
    angle = shape_rng.uniform(0, 2 * math.pi) + rng.normal(0, 0.25)
    scale = rng.normal(1.0, 0.05)
    cos, sin = math.cos(angle), math.sin(angle)
    stretch = 1 + max(p["eccentricity"], 0.0)
    u = (cos * (x - cx) + sin * (y - cy)) / stretch
    v = (-sin * (x - cx) + cos * (y - cy)) * stretch
    rho = np.hypot(u, v)

    # outline: radius as a function of angle, looked up from a 1-degree table (the harmonics belong to the lesion)
    angles = np.linspace(-math.pi, math.pi, 361)
    outline = np.ones(361)
    amplitude = max(p["irregularity"], 0.0)
    for k in range(2, 7):
        weight, phase = shape_rng.uniform(0.3, 1.0), shape_rng.uniform(0, 2 * math.pi)
        outline += amplitude * weight / (k / 2) * np.cos(k * angles + phase)
    outline = (lesion_radius * scale * outline).astype(np.float32)
    radius = outline[((np.arctan2(v, u) + math.pi) * (360 / (2 * math.pi))).astype(np.int32)]
    edge = max(p["softness"], 0.02) * lesion_radius
    inside = 0.5 + 0.5 * np.tanh((radius - rho) / (2 * edge))

    # lesion colour, texture, asymmetric darkening, blue-grey blotches, pale centre
    lesion = np.clip([p["r"], p["g"], p["b"]], 0.02, 1.0).astype(np.float32)
    texture = _smooth_noise(rng, height, width, max(p["texture_cells"], 2)) * max(p["texture"], 0.0)
    dark_x, dark_y = math.cos(shape_rng.uniform(0, 2 * math.pi)), math.sin(shape_rng.uniform(0, 2 * math.pi))
    darkening = min(max(p["asymmetry"], 0.0), 0.9) * np.clip((dark_x * u + dark_y * v) / radius, 0, 1)
    colour = lesion * ((1 + texture) * (1 - darkening))[..., None]
    blotch_amount = min(max(p["blotch"], 0.0), 1.0)
    if blotch_amount > 0.01:
        blotch = np.clip(_smooth_noise(rng, height, width, 6) + 1.5 * (blotch_amount - 0.5), 0, 1) * blotch_amount
        colour = _mix(colour, (0.40, 0.45, 0.58), blotch)
    centre_amount = min(max(p["centre_patch"], 0.0), 1.0)
    if centre_amount > 0.01:
        colour = _mix(colour, (0.92, 0.86, 0.82), centre_amount * np.exp(-np.square(rho / (0.45 * radius))))

    # red dots (vascular lacunae, vessels): small gaussians, each drawn in a window around its centre
    n_dots = int(min(max(round(p["dots"] * 12), 0), 14))
    if n_dots:
        dots = np.zeros_like(rho)
        sigma = 0.025
        half = int(math.ceil(4 * sigma * height))
        for r_, a_ in zip(rng.uniform(0.2, 0.8, n_dots) * lesion_radius, rng.uniform(0, 2 * math.pi, n_dots)):
            du, dv = r_ * math.cos(a_) * stretch, r_ * math.sin(a_) / stretch  # back from lesion frame to image
            px = (cos * du - sin * dv + cx) * height + (width - 1) / 2
            py = (sin * du + cos * dv + cy) * height + (height - 1) / 2
            rows = slice(max(int(py) - half, 0), max(int(py) + half + 1, 0))
            cols = slice(max(int(px) - half, 0), max(int(px) + half + 1, 0))
            window = np.square(u[rows, cols] - r_ * math.cos(a_)) + np.square(v[rows, cols] - r_ * math.sin(a_))
            np.maximum(dots[rows, cols], np.exp(window * (-0.5 / sigma**2)), out=dots[rows, cols])
        colour = _mix(colour, (0.55, 0.08, 0.15), 0.8 * dots)

    skin = np.array([0.90, 0.72, 0.65]) + shape_rng.normal(0, 0.04) + shape_rng.normal(0, 0.02, size=3)  # the patient
    skin = (skin + rng.normal(0, 0.01, size=3)).astype(np.float32)
    image = skin * (1 - inside[..., None]) + colour * inside[..., None]

    # photo conditions: lighting gradient, dermatoscope vignette, hairs, sensor noise
    gx, gy = rng.normal(0, 0.15, size=2)
    light = 1 + gx * x + gy * y + rng.normal(0, 0.04)
    if rng.random() < 0.4:
        light = light * (1 - 0.85 * np.clip((np.hypot(x, y) - 0.55) / 0.12, 0, 1))
    for _ in range(rng.poisson(1.2)):
        a = rng.uniform(0, math.pi)
        offset, bend = rng.uniform(-0.5, 0.5), rng.normal(0, 0.4)
        along = math.sin(a) * x - math.cos(a) * y
        dist = np.abs(math.cos(a) * x + math.sin(a) * y - offset + bend * along * along)
        light = light * (1 - 0.75 * np.clip(1 - dist / 0.008, 0, 1))
    image *= light[..., None]
    image += rng.standard_normal(image.shape, dtype=np.float32) * 0.015
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


# --- Writing ------------------------------------------------------------------------------------------------------

def _part_folder(image_id: str, n_images: int) -> str:
    number = int(image_id.split("_")[1]) - _FIRST_IMAGE_NUMBER
    return "HAM10000_images_part_1" if number < (n_images + 1) // 2 else "HAM10000_images_part_2"


def _write_images(out_dir: str, jobs: list[tuple[str, str, int]], params: np.ndarray, seed: int,
                  size: tuple[int, int]) -> int:
    """Render and save a chunk of images; jobs are (folder, image_id, lesion row). Runs in worker processes."""
    for folder, image_id, lesion in jobs:
        rng = np.random.default_rng([seed, 2, int(image_id.split("_")[1])])
        pixels = render_image(params[lesion], [seed, 3, lesion], rng, size)
        Image.fromarray(pixels).save(os.path.join(out_dir, folder, image_id + ".jpg"), quality=JPEG_QUALITY)
    return len(jobs)


def generate_synthetic(out_dir: str | Path, n_images: int = 3000, seed: int = 0,
                       image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, workers: int | None = None,
                       progress: bool = False) -> Path:
    """Write n_images synthetic JPEGs and HAM10000_metadata.csv in the Kaggle layout under out_dir; return out_dir.

    Same (n_images, seed, image_size) -> same bytes. The metadata file is written last, so a folder without it is an
    unfinished generation.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise HamtuneError(f"synthetic size {n_images!r} is invalid; expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HamtuneError(f"synthetic seed {seed!r} is invalid; expected an integer >= 0")
    width, height = (int(v) for v in image_size)
    if width < 8 or height < 8:
        raise HamtuneError(f"synthetic image size {image_size!r} is invalid; expected (width, height) of at least 8 px")
    out_dir = Path(out_dir)
    table, params = plan_dataset(int(n_images), int(seed))
    for folder in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)

    jobs = [(_part_folder(i, n_images), i, int(lesion)) for i, lesion in zip(table["image_id"], table["lesion"])]
    workers = workers or cpu_count()
    chunk = max(50, math.ceil(len(jobs) / (workers * 8)))
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    bar = tqdm(total=len(jobs), desc="generate synthetic", unit="img", disable=not progress)
    with bar:
        if workers > 1 and len(jobs) >= _PARALLEL_MIN_IMAGES:
            with process_pool(min(workers, len(chunks))) as pool:
                futures = [pool.submit(_write_images, str(out_dir), c, params, seed, (width, height)) for c in chunks]
                for future in futures:
                    bar.update(future.result())
        else:
            for c in chunks:
                bar.update(_write_images(str(out_dir), c, params, seed, (width, height)))

    tmp = out_dir / f".{METADATA_FILE}.tmp"
    table[list(METADATA_COLUMNS)].to_csv(tmp, index=False)
    os.replace(tmp, out_dir / METADATA_FILE)
    return out_dir
