"""Configs of the EDM2 U-Net (architecture) and of an EDM2 preset (architecture + training recipe).

Both are frozen, keyword-only dataclasses; change a field with `dataclasses.replace`, e.g. an
unconditional variant: `replace(get_preset("img512-xs").unet, label_dim=0)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lossfloor.errors import InputError


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Architecture of the magnitude-preserving U-Net F(x, c_noise, class_labels) (edm2.md §2)."""

    img_resolution: int  # side of the square input/output (64 for 512px SD-VAE latents)
    img_channels: int  # input/output channels (4 for SD-VAE latents, 3 for RGB, 1 for grey)
    label_dim: int = 0  # number of classes; 0 = unconditional (no label embedding)
    model_channels: int  # mc: channels of the first level
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # channels per level = mc * mult; len = levels
    num_blocks: int = 3  # encoder blocks per level (decoder levels get num_blocks + 1)
    attn_resolutions: tuple[int, ...] = (16, 8)  # resolutions whose blocks use self-attention
    channels_per_head: int = 64  # attention heads = channels // channels_per_head
    emb_mult: int = 4  # embedding width cemb = emb_mult * mc
    noise_mult: int = 1  # Fourier width of the noise embedding = noise_mult * mc
    dropout: float = 0.0  # dropout probability inside each block's residual branch (training only)
    label_balance: float = 0.5  # t of mp_sum(noise emb, label emb)
    concat_balance: float = 0.5  # t of mp_cat(x, skip) in the decoder
    res_balance: float = 0.3  # t of mp_sum(x, residual branch)
    attn_balance: float = 0.3  # t of mp_sum(x, attention)
    clip_act: float = 256.0  # activations clamped to +-clip_act after each block
    logvar_channels: int = 128  # Fourier width of the uncertainty head u(sigma)

    def __post_init__(self):
        _positive(self, "img_resolution", "img_channels", "model_channels", "num_blocks",
                  "channels_per_head", "emb_mult", "noise_mult", "logvar_channels")
        if self.label_dim < 0:
            raise InputError(f"label_dim: expected >= 0 (0 = unconditional), got {self.label_dim}")
        if not self.channel_mult or any(int(m) < 1 for m in self.channel_mult):
            raise InputError(f"channel_mult: expected positive integers, e.g. (1, 2, 3, 4), got {self.channel_mult}")
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        levels = len(self.channel_mult)
        if self.img_resolution % 2 ** (levels - 1):
            raise InputError(
                f"img_resolution: {self.img_resolution} cannot be halved {levels - 1} times "
                f"(channel_mult {self.channel_mult} has {levels} levels); expected a multiple of {2 ** (levels - 1)}"
            )
        bad = [r for r in self.attn_resolutions if r not in self.resolutions]
        if bad:
            raise InputError(f"attn_resolutions: {bad} are not level resolutions {self.resolutions}")
        for r in self.attn_resolutions:
            c = self.channels[self.resolutions.index(r)]
            if c % self.channels_per_head:
                raise InputError(
                    f"channels_per_head: {self.channels_per_head} does not divide {c} channels at attention "
                    f"resolution {r}; expected a divisor, e.g. 64 with model_channels a multiple of 64"
                )
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout: expected a probability in [0, 1), got {self.dropout}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Side length of each level, e.g. (64, 32, 16, 8)."""
        return tuple(self.img_resolution >> level for level in range(len(self.channel_mult)))

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each level, mc * channel_mult, e.g. (128, 256, 384, 512)."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def emb_channels(self) -> int:
        """cemb = emb_mult * mc (edm2.md §2: 4 mc)."""
        return self.emb_mult * self.model_channels

    @property
    def noise_channels(self) -> int:
        """Width of MPFourier(c_noise) = noise_mult * mc (edm2.md §2: mc)."""
        return self.noise_mult * self.model_channels


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named model with its training recipe (edm2.md §3; Adam and EMA details in §5)."""

    name: str
    unet: UNetConfig
    lr_ref: float  # reference learning rate: lr = lr_ref / sqrt(max(t / t_ref_iters, 1)) * warm-up
    t_ref_iters: int  # t_ref, in iterations (optimizer steps), where the inverse-sqrt decay starts
    batch_n_img: int = 2048  # global batch, images per optimizer step
    duration_n_img: int  # training length in images
    warmup_n_img: int = 10_000_000  # lr ramps linearly over the first warmup_n_img images
    P_mean: float  # ln sigma ~ N(P_mean, P_std^2) during training (edm2.md §4)
    P_std: float
    sigma_data: float = 0.5  # EDM preconditioning's sigma_data
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8

    def __post_init__(self):
        if not isinstance(self.unet, UNetConfig):
            raise InputError(f"unet: expected a UNetConfig, got {type(self.unet).__name__}")
        _positive(self, "lr_ref", "t_ref_iters", "batch_n_img", "duration_n_img", "P_std", "sigma_data")
        if self.warmup_n_img < 0:
            raise InputError(f"warmup_n_img: expected >= 0, got {self.warmup_n_img}")


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise InputError(f"{name}: expected a positive number, got {value!r}")
