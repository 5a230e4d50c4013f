"""Datasets: the shared example format, ShapesWorld, JSONL manifests and IDX files.

Every dataset yields the dicts of :mod:`kineflow.data.example` (tasks ``caption``, ``vqa``,
``edit``), so any of them feeds any model family.
"""

from kineflow.data.example import TASKS, image_to_tensor, tensor_to_image
from kineflow.data.idx import IdxDataset, fashion_mnist, mnist, read_idx, write_idx
from kineflow.data.manifest import (
    ManifestDataset,
    ManifestError,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from kineflow.data.shapes import ShapesWorldDataset, WorldConfig

__all__ = [
    "TASKS",
    "IdxDataset",
    "ManifestDataset",
    "ManifestError",
    "ShapesWorldDataset",
    "WorldConfig",
    "fashion_mnist",
    "image_to_tensor",
    "mnist",
    "read_idx",
    "read_manifest",
    "tensor_to_image",
    "validate_manifest",
    "write_idx",
    "write_manifest",
]
