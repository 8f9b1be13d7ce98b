"""Layer application: OCI layer blobs onto a root directory, safely and fast.

``apply_layer``/``apply_layers`` are the contract (``LayerSession`` for one
layer per root, root after root); see docs/unpack.md for the
design and the security argument.
"""

from ember.unpack.apply import ApplyStats, LayerSession, apply_layer, apply_layers
from ember.unpack.errors import DiffIDMismatch, InvalidLayer, UnpackError, UnsupportedLayer

__all__ = [
    "ApplyStats",
    "DiffIDMismatch",
    "InvalidLayer",
    "LayerSession",
    "UnpackError",
    "UnsupportedLayer",
    "apply_layer",
    "apply_layers",
]
