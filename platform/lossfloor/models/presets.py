"""EDM2 presets (edm2.md §3) and small CPU presets, as one table.

img512-*: 64x64x4 SD-VAE latents of ImageNet-512, 1000 classes, P_mean -0.4, P_std 1.0, t_ref 70k.
img64-*: 64x64x3 RGB ImageNet-64, 1000 classes, P_mean -0.8, P_std 1.6, t_ref 35k (same mc/lr/dropout).
All EDM2 presets: batch 2048, sigma_data 0.5, Adam(0.9, 0.99), 10M-image lr warm-up.

tiny / tiny32 are ours **[choice]**, for tests and CPU smoke studies: `tiny` for 8x8x1 data with 10
classes (scikit-learn digits), `tiny32` for 32x32x3 data with 10 classes (CIFAR-10). Their recipes
(lr_ref, t_ref, batch, duration) are untuned starting points, not EDM2 numbers. `sized_preset` (the CLI's
`--preset auto`) is `tiny` sized for data of any square resolution and any number of channels.
"""

from __future__ import annotations

from dataclasses import replace

from lossfloor.errors import InputError
from lossfloor.models.config import Preset, UNetConfig

Mi = 1 << 20  # EDM2 counts durations in binary mega-images: 2048Mi = 2,147,483,648 images

# EDM2 ladder (edm2.md §3). Columns:
#  name          res  ch  labels  mc   dropout  lr_ref  t_ref    duration  P_mean  P_std
_EDM2 = [
    ("img512-xs",  64,  4,  1000,  128,  0.00,  0.0120,  70_000,  2048 * Mi,  -0.4,  1.0),
    ("img512-s",   64,  4,  1000,  192,  0.00,  0.0100,  70_000,  2048 * Mi,  -0.4,  1.0),
    ("img512-m",   64,  4,  1000,  256,  0.10,  0.0090,  70_000,  2048 * Mi,  -0.4,  1.0),
    ("img512-l",   64,  4,  1000,  320,  0.10,  0.0080,  70_000,  1792 * Mi,  -0.4,  1.0),
    ("img512-xl",  64,  4,  1000,  384,  0.10,  0.0070,  70_000,  1280 * Mi,  -0.4,  1.0),
    ("img512-xxl", 64,  4,  1000,  448,  0.10,  0.0065,  70_000,   896 * Mi,  -0.4,  1.0),
    ("img64-s",    64,  3,  1000,  192,  0.00,  0.0100,  35_000,  1024 * Mi,  -0.8,  1.6),
    ("img64-m",    64,  3,  1000,  256,  0.10,  0.0090,  35_000,  2048 * Mi,  -0.8,  1.6),
    ("img64-l",    64,  3,  1000,  320,  0.10,  0.0080,  35_000,  1024 * Mi,  -0.8,  1.6),
    ("img64-xl",   64,  3,  1000,  384,  0.10,  0.0070,  35_000,   640 * Mi,  -0.8,  1.6),
]  # fmt: skip

PRESETS: dict[str, Preset] = {
    name: Preset(
        name=name,
        unet=UNetConfig(img_resolution=res, img_channels=ch, label_dim=labels, model_channels=mc, dropout=p),
        lr_ref=lr_ref, t_ref_iters=t_ref, duration_n_img=duration, P_mean=p_mean, P_std=p_std,
    )
    for name, res, ch, labels, mc, p, lr_ref, t_ref, duration, p_mean, p_std in _EDM2
}

# Small CPU presets [choice]: two levels (8, 4) / three levels (32, 16, 8), 2 blocks per encoder level.
PRESETS["tiny"] = Preset(
    name="tiny",
    unet=UNetConfig(img_resolution=8, img_channels=1, label_dim=10, model_channels=32, channel_mult=(1, 2),
                    num_blocks=2, attn_resolutions=(4,), channels_per_head=32),
    lr_ref=0.01, t_ref_iters=1_000, batch_n_img=128, duration_n_img=Mi // 4, warmup_n_img=32 * 1024,
    P_mean=-0.8, P_std=1.6,
)
PRESETS["tiny32"] = Preset(
    name="tiny32",
    unet=UNetConfig(img_resolution=32, img_channels=3, label_dim=10, model_channels=32, channel_mult=(1, 2, 2),
                    num_blocks=2, attn_resolutions=(8,), channels_per_head=32),
    lr_ref=0.01, t_ref_iters=2_000, batch_n_img=256, duration_n_img=2 * Mi, warmup_n_img=128 * 1024,
    P_mean=-0.8, P_std=1.6,
)


AUTO = "auto"  # the name under which a command offers `sized_preset` (sized from its data)
MAX_HALVINGS = 3  # EDM2's U-Net: 4 levels, 64 -> 8


def sized_preset(sample_shape: tuple[int, ...]) -> Preset:
    """`tiny`'s recipe with an unconditional U-Net sized for samples of shape (C, H, H) **[choice]**.

    The U-Net halves the side once per level, so every level's side must be whole: the side is halved
    while it is even and its half is at least 4, at most MAX_HALVINGS times (8 -> (8, 4): `tiny`'s levels;
    16 -> (16, 8, 4); an odd side -> one level). channel_mult (1, 2, ..., 2), 2 blocks per level, 32
    channels, attention at the lowest level when its side is at most 16. Named auto-HxWxC.
    InputError for samples that are not square images (C, H, H).
    """
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2] or min(sample_shape) < 1:
        raise InputError(f"preset {AUTO}: expected square images of shape (C, H, H), got samples of shape "
                         f"{tuple(sample_shape)}")
    channels, side = int(sample_shape[0]), int(sample_shape[1])
    levels = 1
    while levels <= MAX_HALVINGS and (side >> (levels - 1)) % 2 == 0 and side >> levels >= 4:
        levels += 1
    lowest = side >> (levels - 1)
    tiny = PRESETS["tiny"]
    unet = replace(tiny.unet, img_resolution=side, img_channels=channels, label_dim=0,
                   channel_mult=(1,) + (2,) * (levels - 1), attn_resolutions=(lowest,) if lowest <= 16 else ())
    return replace(tiny, name=f"{AUTO}-{side}x{side}x{channels}", unet=unet)


def get_preset(name: str) -> Preset:
    """The preset called `name` (see PRESETS); an unknown name raises InputError listing valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"preset: unknown {name!r}; expected one of {', '.join(PRESETS)}") from None
