"""HAM10000 data layer: validating reader, synthetic stand-in, decode-once cache, lesion-grouped split.

Exploration plots live in hamtune.data.explore and are imported only by the command that draws them: a trial imports
this package, and matplotlib would cost it about 2 s per fresh worker process.
"""

from hamtune.data.arrays import SplitArrays
from hamtune.data.cache import PreparedData, default_cache_dir, prepare, prepare_spec_data
from hamtune.data.ham10000 import encode_meta, load_metadata
from hamtune.data.split import SplitSpec

__all__ = [
    "PreparedData", "SplitArrays", "SplitSpec", "default_cache_dir", "encode_meta", "load_metadata", "prepare",
    "prepare_spec_data",
]
