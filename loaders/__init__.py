"""fastssl's data layer: sources, mixture, backends and batched augmentation.

``loaders`` never imports ``fastssl``: it is usable by any trainer. Optional heavy
dependencies (DALI, FFCV, webdataset) are imported only inside the modules that need them.
"""
from .batch import Batch
from .base import ArraySource, Source, build_source, decode_image, register_source, SOURCES
from .errors import ConfigError, DataError, SampleError, check_keys

__all__ = [
    "Batch", "Source", "ArraySource", "build_source", "register_source", "decode_image", "SOURCES",
    "ConfigError", "DataError", "SampleError", "check_keys",
]
