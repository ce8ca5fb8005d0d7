"""EDM2's ImageNet preprocessing: an image of any size -> an R x R RGB crop (uint8, (3, R, R)).

The rule is ADM's centre crop ("center-crop-dhariwal" in EDM2's dataset tool), on an image converted to
8-bit RGB first (grey and palette images expanded, CMYK converted, an alpha channel dropped):

1. while the short side is >= 2R, halve the image with a box filter (each side w -> floor(w / 2));
2. scale it so that the short side is R, bicubic (Pillow's, a = -0.5, antialiased when shrinking), each
   side rounded to the nearest integer (w -> round(w * R / short side));
3. take the centre R x R crop, rows from floor((h - R) / 2) and columns from floor((w - R) / 2).

The halving steps keep the bicubic step to a shrink of less than 2x, so its antialiasing stays narrow and
large photographs do not alias.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lossfloor.data.images import open_image


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """A PIL image (already RGB) -> uint8 (3, R, R) by the module's rule."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.Resampling.BICUBIC)
    top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
    pixels = np.asarray(image, dtype=np.uint8)[top : top + resolution, left : left + resolution]  # (R, R, 3)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess(data: bytes, where: str, resolution: int) -> np.ndarray:
    """Image bytes (PNG/JPEG, any size and mode) -> uint8 (3, R, R); InputError naming `where` if they
    are no image Pillow can decode."""
    return center_crop(open_image(data, where, mode="RGB"), resolution)
