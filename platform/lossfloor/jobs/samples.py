"""A grid of samples from a training checkpoint: EDM Heun samples of its network, tiled into one PNG.

    n = grid_size("auto", config, forward_flops, device=None)   # 64 for cheap pixel data, else 0
    write_png(samples_grid(checkpoint, n), "samples.png")

`lossfloor.jobs.record.record_training` hands the PNG to `lossfloor.tracking`, which logs it.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from lossfloor.errors import InputError

CHEAP_SAMPLING_FLOPS = 5e12  # "auto" samples on a CPU only when the grid costs less than this
PROGRESS_SECONDS = 30.0  # a progress line at most this often while a grid is sampled
BATCH = 256  # samples per sampler batch (lossfloor.train.generate's default)
log = logging.getLogger(__name__)


def grid_size(samples: int | str | None, config, forward_flops: float, device: str | None) -> int:
    """The grid's size: `samples` itself, or for "auto" 64 on pixel data (1 or 3 channels) when cheap (a
    GPU, or under CHEAP_SAMPLING_FLOPS on the CPU), else 0; 0 or None: no grid."""
    from lossfloor.train import resolve

    unet = resolve(config).preset.unet
    if samples in (None, 0):
        return 0
    if samples != "auto":
        if not (isinstance(samples, int) and samples > 0):
            raise InputError(f"samples: expected a grid size like 64, 0 or 'auto', got {samples!r}")
        return samples
    if unet.img_channels not in (1, 3):
        return 0  # latents: a grid would need the VAE decoder
    import torch

    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    n = 64
    cost = n * 63 * forward_flops  # 32 Heun steps = 63 network evaluations per sample
    return n if cuda or (math.isfinite(cost) and cost < CHEAP_SAMPLING_FLOPS) else 0


def samples_grid(checkpoint, n: int, *, seed: int = 0, device: str | None = None, num_steps: int = 32) -> np.ndarray:
    """(H', W', C) uint8 grid of n EDM Heun samples (lossfloor.train.generate) of a checkpoint's network
    (its evaluated EMA if the config has eval_ema, else the raw weights); pixel data in [-1, 1]."""
    import torch

    from lossfloor.train import generate
    from lossfloor.train.objectives import load_denoiser

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    den, shape, label_dim = load_denoiser(checkpoint, device=device)
    total = math.ceil(n / BATCH) * (2 * num_steps - 1)  # Heun: 2 evaluations per step but the last
    log.info("sampling a %d-image grid from the newest checkpoint %s (EDM Heun, %d steps, %d network evaluations "
             "of %d images at most) on %s", n, Path(checkpoint).name, num_steps, total, min(n, BATCH), device)
    t0 = time.monotonic()
    done, shown = 0, t0

    def counted(x, sigma, labels):  # the denoiser, with a progress line every PROGRESS_SECONDS
        nonlocal done, shown
        out = den(x, sigma, labels)
        done += 1
        if time.monotonic() - shown > PROGRESS_SECONDS:
            shown = time.monotonic()
            rate = done / (shown - t0)
            log.info("samples grid: %d/%d network evaluations (%.0f%%), ETA %.0f s", done, total, 100 * done / total,
                     (total - done) / rate)
        return out

    x, _ = generate(counted, n, shape, label_dim=label_dim, seed=seed, batch=BATCH, device=device, num_steps=num_steps)
    log.info("samples grid: %d images in %.1f s", n, time.monotonic() - t0)
    return tile(x.numpy())


def tile(x: np.ndarray, scale: int | None = None) -> np.ndarray:
    """(n, C, H, W) values in [-1, 1] -> (rows*H*s, cols*W*s, C) uint8, a near-square grid, each image
    enlarged s times (default: to at least 32 pixels) with a 1-pixel gap."""
    n, c, h, w = x.shape
    s = scale or max(1, math.ceil(32 / max(h, w)))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    from lossfloor.train.metrics import to_uint8

    img = to_uint8(torch.as_tensor(np.asarray(x))).numpy()  # (n, C, H, W), the bytes a PNG would hold
    img = img.repeat(s, axis=2).repeat(s, axis=3)  # (n, C, H*s, W*s)
    H, W = h * s + 1, w * s + 1
    grid = np.full((c, rows * H - 1, cols * W - 1), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * H : r * H + h * s, q * W : q * W + w * s] = img[i]
    return grid.transpose(1, 2, 0)  # (C, H', W') -> (H', W', C)


def write_png(grid: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return Path(path)
