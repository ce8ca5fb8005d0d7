"""A Stable-Diffusion-style VAE (diffusers `AutoencoderKL`) from a local folder: pixels <-> latents.

    vae = load_vae("sd-vae-ft-mse/", device="cuda")     # config.json + diffusion_pytorch_model.safetensors
    mean_std = encode_pixels(vae, pixels)                # uint8 (n, 3, R, R) -> float32 (n, 8, R/8, R/8)
    images = decode_latents(vae, x, stats)               # whitened (n, 4, h, w) -> uint8 (n, 3, 8h, 8w)

Pixels enter the encoder as x / 255 in [0, 1] and leave the decoder clamped to [0, 1], as EDM2 does
(its published ImageNet-512 networks, and LATENT_MEAN / LATENT_STD, are of latents encoded that way). The
encoder's output is a diagonal Gaussian posterior per image; we keep its mean and std (8 channels, raw
VAE units), EDM2's `img-mean-std` layout. Whitening and its inverse are `lossfloor.data.edm2`'s.

diffusers and torch are imported inside the functions: `lossfloor.data` imports without them. Only
safetensors weights are read (a pickled .bin could run code), and nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lossfloor.data.edm2 import EDM2_STATS, LatentStats, unwhiten_latent
from lossfloor.errors import InputError

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_vae_folder(folder: str | Path, flag: str = "--vae") -> dict:
    """Before any work: FOLDER holds an AutoencoderKL's config.json and safetensors weights; its config."""
    path = Path(folder).expanduser()
    expected = f"expected a diffusers AutoencoderKL folder ({CONFIG} and {WEIGHTS}, e.g. sd-vae-ft-mse)"
    if not path.is_dir():
        raise InputError(f"{flag} {folder}: {'not a folder' if path.exists() else 'no such folder'}; {expected}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        raise InputError(f"{flag} {folder}: no readable {CONFIG}; {expected}") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise InputError(f"{flag} {folder}: {CONFIG} describes {name!r}, not an AutoencoderKL; {expected}")
    if config.get("latent_channels", 4) != 4:
        raise InputError(f"{flag} {folder}: latent_channels {config['latent_channels']}; expected 4, the 8 stored "
                         "channels (mean and std) of EDM2's latent layout")
    if not (path / WEIGHTS).is_file():
        raise InputError(f"{flag} {folder}: no weights ({WEIGHTS}); {expected}")
    return config


def load_vae(folder: str | Path, *, device: str = "cpu", flag: str = "--vae"):
    """The AutoencoderKL of FOLDER on `device`, in eval mode without gradients (float32)."""
    import diffusers
    import torch

    check_vae_folder(folder, flag)
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(str(Path(folder).expanduser()), use_safetensors=True,
                                                      local_files_only=True, torch_dtype=torch.float32,
                                                      low_cpu_mem_usage=False)  # no `accelerate` needed
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise InputError(f"{flag} {folder}: cannot load it as an AutoencoderKL "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return vae.to(device).eval().requires_grad_(False)


def downsampling(config) -> int:
    """Image pixels per latent pixel along a side (8 for SD-VAE) of a VAE config (dict or vae.config)."""
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


def latent_shape(config, resolution: int) -> tuple[int, int, int]:
    """(2C, h, w) of one image's stored mean and std at `resolution` (C latent channels)."""
    down = downsampling(config)
    return 2 * config.get("latent_channels", 4), resolution // down, resolution // down


def encode_pixels(vae, pixels: np.ndarray, *, batch: int = 8) -> np.ndarray:
    """uint8 (n, 3, R, R) -> float32 (n, 2C, R/f, R/f): the posterior mean then std of each image
    (C latent channels), `batch` images per encoder call, on the VAE's device."""
    import torch

    device = next(vae.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[start : start + batch]).to(device, torch.float32) / 255
            posterior = vae.encode(x).latent_dist
            out.append(torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy())
    return np.concatenate(out)


def decode_latents(vae, latents: np.ndarray, stats: LatentStats = EDM2_STATS, *, batch: int = 8) -> np.ndarray:
    """Whitened latents (n, C, h, w), as the samplers produce them -> uint8 images (n, 3, f*h, f*w):
    un-whitened with the set's `stats`, decoded, clamped to [0, 1] and rounded to 8 bits."""
    import torch

    device = next(vae.parameters()).device
    raw = unwhiten_latent(np.asarray(latents, dtype=np.float32), stats)
    out = []
    with torch.inference_mode():
        for start in range(0, len(raw), batch):
            z = torch.from_numpy(raw[start : start + batch]).to(device)
            x = vae.decode(z).sample.float().clamp(0, 1)
            out.append((x * 255 + 0.5).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)
