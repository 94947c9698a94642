"""HAM10000 data layer: validating reader, synthetic stand-in, decode-once cache, lesion-grouped split, exploration."""

from hamtune.data.arrays import SplitArrays
from hamtune.data.cache import PreparedData, default_cache_dir, prepare
from hamtune.data.explore import class_table
from hamtune.data.ham10000 import encode_meta, load_metadata
from hamtune.data.split import SplitSpec

__all__ = [
    "PreparedData", "SplitArrays", "SplitSpec", "class_table", "default_cache_dir", "encode_meta", "load_metadata",
    "prepare",
]
