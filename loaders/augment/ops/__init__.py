"""Augmentation ops, each defined once: one module per op.

Every op module declares

* ``NAME`` and ``OP_ID`` (a fixed constant: the op's draws come from their own generator seeded
  by ``hash(seed, key, view, OP_ID)``, see :mod:`loaders.augment.sampler`),
* ``PARAMS``: ``{name: (shape suffix after n, dtype)}`` -- what it draws per sample,
* ``active(spec) -> bool``: whether the view ``spec`` uses the op at all,
* ``sample(spec, n, g, **ctx) -> {name: tensor [n, ...]}`` on the CPU generator ``g``,
* ``apply(x, params, spec, **ctx)``: the torch executor (any device; ``x`` float32
  ``[B,3,S,S]`` in ``[0, 1]`` except for ``crop``, which takes the uint8 input).

Executors elsewhere (OpenCV in the loader workers: :mod:`loaders.cpu_augment`; DALI's graph:
:mod:`loaders.dali_backend`) consume the same drawn parameters. :data:`ORDER` is the order in
which a view applies them (torchvision's).
"""
from . import blur, crop, flip, grayscale, jitter, normalize, randaugment, solarize

__all__ = ["ORDER", "BY_NAME", "crop", "flip", "jitter", "grayscale", "blur", "solarize", "randaugment",
           "normalize"]

#: application order of a view's ops
ORDER = (crop, flip, jitter, grayscale, blur, solarize, randaugment, normalize)
#: op name -> module
BY_NAME = {m.NAME: m for m in ORDER}
assert len({m.OP_ID for m in ORDER}) == len(ORDER), "op ids must be distinct"
