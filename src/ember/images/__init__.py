"""The host image service: pull, name, list, inspect and remove images."""

from ember.images.errors import ImageError, ImageNotFound, InvalidImage, InvalidSource
from ember.images.model import Image, Layer
from ember.images.service import ImageService
from ember.store.images import ImageRecord

__all__ = [
    "Image",
    "ImageError",
    "ImageNotFound",
    "ImageRecord",
    "ImageService",
    "InvalidImage",
    "InvalidSource",
    "Layer",
]
