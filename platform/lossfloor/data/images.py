"""8-bit images (PNG/JPEG) as samples: decoded to (C, H, W) and scaled to [-1, 1] as x/127.5 - 1.

Grey-scale images give one channel, colour images three (palette, alpha and CMYK images are converted to
RGB, grey+alpha to grey). Every image of a source must have the same (C, H, W) as the first one.
Also the image-folder source: images directly in the folder (no labels) or in class sub-folders
(integer labels in sorted folder order, counting only folders that hold images).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from lossfloor.data.files import DirTree, ZipTree
from lossfloor.data.source import Chunk, Reader, SourceInfo
from lossfloor.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_NORMALISATION = "uint8/127.5-1"
_MODES = {"1": "L", "L": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB", "P": "RGB", "PA": "RGB",
          "CMYK": "RGB", "YCbCr": "RGB"}  # stored mode -> mode decoded to (8-bit only)


# What Pillow raises for a non-image, a truncated image or an absurdly large one.
_OPEN_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] as x/127.5 - 1."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _open(data: bytes, where: str) -> Image.Image:
    if not data:
        raise InputError(f"{where}: expected a PNG or JPEG image, got an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise InputError(f"{where}: expected a PNG or JPEG image, its {len(data)} bytes are no image format "
                         "Pillow knows") from None
    except _OPEN_ERRORS as e:
        raise InputError(f"{where}: expected a PNG or JPEG image ({e})") from e
    if image.mode not in _MODES:
        raise InputError(f"{where}: expected an 8-bit grey or colour image, got mode {image.mode}")
    return image


def image_shape(data: bytes, where: str) -> tuple[int, int, int]:
    """(C, H, W) an image decodes to, read from its header only."""
    image = _open(data, where)
    channels = 1 if _MODES[image.mode] == "L" else 3
    return channels, image.height, image.width


def open_image(data: bytes, where: str, mode: str | None = None) -> Image.Image:
    """Image bytes -> a decoded PIL image in its 8-bit grey or colour mode, or in `mode` ("RGB": grey
    and CMYK converted, alpha dropped)."""
    image = _open(data, where)
    target = mode or _MODES[image.mode]
    try:
        image.load()
        return image.convert(target) if image.mode != target else image
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{where}: expected a PNG or JPEG image, cannot decode it ({e})") from e


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Image bytes -> uint8 array (C, H, W)."""
    pixels = np.asarray(open_image(data, where), dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


class ImageReader(Reader):
    """A sorted list of image members of a tree, with optional labels."""

    def __init__(self, path: str, tree: DirTree | ZipTree, names: list[str], labels: np.ndarray | None):
        super().__init__(path)
        if len(names) < 2:
            raise InputError(f"{path}: expected at least 2 images, found {len(names)}")
        self.tree, self.names, self.labels = tree, names, labels

    @functools.cached_property
    def _shape(self) -> tuple[int, int, int]:
        with self.tree.open() as read:
            return image_shape(read(self.names[0]), self.tree.where(self.names[0]))

    def info(self) -> SourceInfo:
        return SourceInfo(count=len(self.names), sample_shape=self._shape,
                          has_labels=self.labels is not None, normalisation=PIXEL_NORMALISATION)

    def blocks(self, rows: int) -> Iterator[Chunk]:
        shape = self._shape
        with self.tree.open() as read:
            for start in range(0, len(self.names), rows):
                names = self.names[start : start + rows]
                block = np.empty((len(names), *shape), dtype=np.float32)  # (n, C, H, W)
                for i, name in enumerate(names):
                    pixels = decode_image(read(name), self.tree.where(name))
                    if pixels.shape != shape:
                        raise InputError(
                            f"{self.tree.where(name)}: expected an image of shape (C, H, W) = {shape} like "
                            f"{self.names[0]}, got {pixels.shape}"
                        )
                    block[i] = scale_pixels(pixels)
                yield block, None if self.labels is None else self.labels[start : start + len(names)]


def image_folder_reader(path: str, tree: DirTree, names: list[str]) -> ImageReader:
    """Images directly under the tree's root (no labels) or in class sub-folders (labels in sorted folder
    order); `names` are the tree's file names."""
    names, labels = folder_labels(path, names)
    return ImageReader(path, tree, names, labels)


def folder_labels(path: str, names: list[str]) -> tuple[list[str], np.ndarray | None]:
    """The image names among `names` and their labels: none when all lie directly in the root, the index
    of their top folder in sorted order when all lie in sub-folders (ImageNet's training layout:
    one folder per class); InputError for a mix of the two or no image at all."""
    names = [n for n in names if is_image_name(n)]
    if not names:
        raise InputError(
            f"{path}: unknown source kind: a folder without PNG/JPEG images, CIFAR-10 batches "
            "(data_batch_1..5), EDM2 data (dataset.json) or shards (meta.json)"
        )
    top = [n for n in names if "/" not in n]
    if top and len(top) != len(names):
        raise InputError(
            f"{path}: expected images either all directly in the folder or all in class sub-folders, "
            f"found both (e.g. {top[0]})"
        )
    if top:
        return names, None
    classes = sorted({n.split("/", 1)[0] for n in names})
    index = {c: i for i, c in enumerate(classes)}
    return names, np.array([index[n.split("/", 1)[0]] for n in names], dtype=np.int64)
