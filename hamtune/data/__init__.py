"""The data room: HAM10000 folders (Kaggle and ISIC 2018 layouts), the synthetic stand-in and the official downloads,
read and validated, decoded once into the cache, and split by lesion.

Imports only hamtune.vocab, hamtune.errors and hamtune.io from outside: nothing here knows of training, search or
reports. Inside, the arrows point one way: tables <- ham10000, isic2018 <- sources; fetch <- download; all of them <- cache. Exploration
plots live in hamtune.reports.exploration; a trial imports this package, and matplotlib would cost it about 2 s per
fresh worker process.
"""

from hamtune.data.arrays import SplitArrays, encode_meta
from hamtune.data.cache import PreparedData, default_cache_dir, prepare, prepare_spec_data
from hamtune.data.sources import load_metadata
from hamtune.data.split import SplitSpec

__all__ = [
    "PreparedData", "SplitArrays", "SplitSpec", "default_cache_dir", "encode_meta", "load_metadata", "prepare",
    "prepare_spec_data",
]
