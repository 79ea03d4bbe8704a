"""fastssl's data layer: sources, mixture, backends and batched augmentation.

``loaders`` never imports ``fastssl``: it is usable by any trainer. Optional heavy
dependencies (DALI, FFCV, webdataset) are imported only inside the modules that need them.
"""
import os as _os

# PyTorch's CPU allocator backs allocations of >= 2 MB with transparent huge pages when
# THP_MEM_ALLOC_ENABLE is set (read at its first large allocation): every fresh batch buffer then
# costs ~500x fewer page faults. Measured on the 2-core CPU machine: allocating and filling a
# float 64x3x224x224 view 290 -> 62 us per sample. FASTSSL_THP=0 keeps PyTorch's default.
if _os.environ.get("FASTSSL_THP", "1") != "0":
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .base import SOURCES, ArraySource, Source, build_source, decode_image, register_source
from .batch import Batch
from .errors import ConfigError, DataError, SampleError, check_keys

__all__ = [
    "Batch", "Source", "ArraySource", "build_source", "register_source", "decode_image", "SOURCES",
    "ConfigError", "DataError", "SampleError", "check_keys",
]
