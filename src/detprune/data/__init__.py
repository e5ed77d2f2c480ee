"""Datasets: a deterministic synthetic COCO set, COCO loading and checks, VOC conversion.

Modules:

* :mod:`detprune.data.synth` - :func:`write_synthetic`, the synthetic shapes dataset.
* :mod:`detprune.data.coco` - :func:`check_coco`, :class:`CocoDetection`, :func:`collate`.
* :mod:`detprune.data.transforms` - named augmentation presets (:func:`get_transform`).
* :mod:`detprune.data.voc` - :func:`voc_to_coco`, Pascal VOC XML to COCO JSON.
* :mod:`detprune.data.splits` - :func:`carve_files`, a seeded tune split of a training JSON.
"""
