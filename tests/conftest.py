"""Shared test fixtures: the real 140-image sample, a small synthetic set in the Kaggle layout, and a local Ray.

The tests mirror the packages (tests/data, tests/training, tests/search, tests/final, tests/serve); helpers that
several folders use (model_fixtures, isic_fixtures, scorer_env) sit here beside this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hamtune.search.driver import ray_environment

# Ray's log handler keeps the sys.stderr of the moment Ray is first imported (ray._private.log.PlainRayHandler is a
# StreamHandler). hamtune imports Ray only when a search starts; in a test that is inside a test's own output capture,
# whose stream pytest closes when that test ends, and Ray's next warning in a later test then fails to print. So Ray
# is imported here, at collection, when sys.stderr is pytest's session-long stream; its environment first, as
# hamtune's driver sets it.
ray_environment(None)
import ray  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO.parent / "shared/data/ham10000-sample"
TINY_SYNTHETIC_SIZE = 3000
TINY_SYNTHETIC_IMAGE = (32, 24)  # (width, height): small JPEGs keep generation of thousands of images cheap


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory):
    """Point $HAMTUNE_CACHE_DIR at a session temp folder so no test writes to the user's ~/.cache/hamtune."""
    previous = os.environ.get("HAMTUNE_CACHE_DIR")
    path = tmp_path_factory.mktemp("hamtune-cache")
    os.environ["HAMTUNE_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("HAMTUNE_CACHE_DIR", None)
    else:
        os.environ["HAMTUNE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real HAM10000 sample (140 images, 20 per class, Kaggle layout); read-only."""
    if not (SAMPLE_DIR / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A synthetic HAM10000-like folder of TINY_SYNTHETIC_SIZE 32x24 JPEGs (seed 0), generated once per session."""
    from hamtune.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("tiny-synthetic"), n_images=TINY_SYNTHETIC_SIZE, seed=0,
                              image_size=TINY_SYNTHETIC_IMAGE, workers=2)


@pytest.fixture(scope="session")
def tiny_synthetic_prepared(tiny_synthetic, tmp_path_factory):
    """tiny_synthetic decoded at 16 px and split with the default SplitSpec (a PreparedData)."""
    from hamtune.data import prepare

    return prepare(tiny_synthetic, 16, cache_dir=tmp_path_factory.mktemp("tiny-synthetic-cache"), progress=False,
                   workers=2)


@pytest.fixture(scope="module", autouse=True)
def no_ray_between_modules():
    """End any Ray a module started (in-process CLI searches leave theirs up), so the next module starts its own with
    its own environment (Ray's workers inherit the variables of the process that started Ray)."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@pytest.fixture(scope="module")
def ray_worker_env():
    """Variables this module's Ray workers must see; Ray's workers inherit the environment of the process that
    started Ray, so a module that needs some overrides this fixture and sets them before ray_local starts Ray."""
    return {}


@pytest.fixture(scope="module")
def ray_local(ray_worker_env):
    """A local Ray of 2 CPUs on 127.0.0.1 for this module, started as hamtune starts it, stopped after."""

    from hamtune.search.driver import init_ray

    ray.shutdown()  # a Ray left by an earlier module (an in-process CLI search) has workers of another environment
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()
