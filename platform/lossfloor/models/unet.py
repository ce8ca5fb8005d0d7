"""The EDM2 magnitude-preserving U-Net F(x, c_noise, class_labels) and its uncertainty head u(sigma).

Implemented from the clean-room description in edm2.md §2 (Karras et al., "Analyzing and Improving
the Training Dynamics of Diffusion Models", CVPR 2024, config G). No biases, no normalisation layers:
every layer is magnitude-preserving (`lossfloor.models.mp`). The forward has no data-dependent
Python control flow, so `torch.compile` traces it whole.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lossfloor.errors import InputError
from lossfloor.models.config import Preset, UNetConfig
from lossfloor.models.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize


class Block(nn.Module):
    """One U-Net block (edm2.md §2, Block): 3x3 conv pair with multiplicative modulation, optional
    1x1 skip conv, optional self-attention.

    Encoder: resample -> 1x1 skip conv (if Cin != Cout) -> pixel norm -> residual branch -> mp_sum.
    Decoder: resample -> residual branch on the raw input -> 1x1 skip conv at the merge -> mp_sum.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, flavor: str,
                 config: UNetConfig, resample: str | None = None, attention: bool = False,
                 takes_skip: bool = False):
        super().__init__()
        assert flavor in ("enc", "dec") and resample in (None, "down", "up")
        self.flavor = flavor
        self.resample = resample
        self.takes_skip = takes_skip  # the decoder feeds this block mp_cat(x, skip)
        self.num_heads = out_channels // config.channels_per_head if attention else 0
        self.dropout = config.dropout
        self.res_balance = config.res_balance
        self.attn_balance = config.attn_balance
        self.clip_act = config.clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))  # modulation gain, init 0 (edm2.md §2)
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if not self.emb_gain.is_meta:
            with torch.no_grad():
                self.emb_gain.zero_()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Resample: down = 2x2 average pool, up = 2x nearest (edm2.md §2, Block)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)  # (B, C, H, W) -> (B, C, H/2, W/2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)

        # Encoder: 1x1 skip conv, then pixel norm N over channels per pixel (edm2.md §2, Block)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch: y = conv3x3(mp_silu(x)); y = mp_silu(y c), c = 1 + Lin(emb) with gain init 0
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, Cout), fp32
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))  # (B, Cout) -> (B, Cout, 1, 1) broadcast
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)

        # Merge: decoder applies its 1x1 skip conv here; x = mp_sum(x, y, 0.3)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention: per-head N over channels of q, k, v; softmax(q k / sqrt(64)) v; mp_sum(x, y, 0.3)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)

        # Clamp activations to +-256 (edm2.md §2, Block)
        return x.clamp(-self.clip_act, self.clip_act)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        nh = self.num_heads
        qkv = self.attn_qkv(x)  # (B, 3C, H, W)
        qkv = qkv.reshape(B, 3, nh, C // nh, H * W)  # (B, 3, nh, hs, HW)
        qkv = normalize(qkv, dim=3)  # N over each head's channels, per pixel
        q, k, v = qkv.transpose(3, 4).unbind(1)  # each (B, nh, HW, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hs); scale 1/sqrt(hs) (SDPA default)
        y = y.transpose(2, 3).reshape(B, C, H, W)  # (B, nh, hs, HW) -> (B, C, H, W)
        return self.attn_proj(y)


class UNet(nn.Module):
    """F(x, c_noise, class_labels) of EDM2 (edm2.md §2, UNet).

    Levels of side img_resolution / 2^l with mc * channel_mult[l] channels; the first level opens with
    a 3x3 conv of the input plus a constant-1 channel, the others with a down Block; num_blocks Blocks
    per encoder level; every encoder output is a skip. The decoder's lowest level opens with two
    Blocks (the first with attention if that level has it), the others with an up Block; num_blocks + 1
    Blocks per level, each fed mp_cat(x, skip, 0.5). Output: 3x3 conv with learned gain init 0.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        cemb = cfg.emb_channels
        attn = set(cfg.attn_resolutions)
        levels = len(cfg.channel_mult)

        # Embedding: emb = mp_silu(mp_sum(Lin(MPFourier(c_noise)), Lin(onehot sqrt(label_dim)), 0.5))
        self.emb_fourier = MPFourier(cfg.noise_channels)
        self.emb_noise = MPConv(cfg.noise_channels, cemb)
        self.emb_label = MPConv(cfg.label_dim, cemb) if cfg.label_dim else None

        # Encoder
        self.enc_conv = MPConv(cfg.img_channels + 1, cfg.channels[0], (3, 3))  # +1: constant-1 channel
        self.enc = nn.ModuleList()
        cout = cfg.channels[0]
        skip_channels = [cout]
        for level, (res, ch) in enumerate(zip(cfg.resolutions, cfg.channels)):
            if level > 0:
                self.enc.append(Block(cout, cout, cemb, flavor="enc", resample="down", config=cfg))
                skip_channels.append(cout)
            for _ in range(cfg.num_blocks):
                self.enc.append(Block(cout, ch, cemb, flavor="enc", attention=res in attn, config=cfg))
                cout = ch
                skip_channels.append(cout)

        # Decoder
        self.dec = nn.ModuleList()
        for level in reversed(range(levels)):
            res, ch = cfg.resolutions[level], cfg.channels[level]
            if level == levels - 1:
                self.dec.append(Block(cout, cout, cemb, flavor="dec", attention=res in attn, config=cfg))
                self.dec.append(Block(cout, cout, cemb, flavor="dec", config=cfg))
            else:
                self.dec.append(Block(cout, cout, cemb, flavor="dec", resample="up", config=cfg))
            for _ in range(cfg.num_blocks + 1):
                cin = cout + skip_channels.pop()
                self.dec.append(Block(cin, ch, cemb, flavor="dec", attention=res in attn, takes_skip=True,
                                      config=cfg))
                cout = ch
        assert not skip_channels

        # Output: 3x3 conv with learned gain init 0, so F = 0 at init
        self.out_conv = MPConv(cout, cfg.img_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([]))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if not self.out_gain.is_meta:
            with torch.no_grad():
                self.out_gain.zero_()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, img_channels, R, R) in the dtype to compute in (fp32, bf16, fp16); c_noise: (B,) =
        ln(sigma)/4; class_labels: (B, label_dim) one-hot or (B,) integer classes (ignored when
        label_dim = 0). Returns (B, img_channels, R, R) in x's dtype."""
        cfg = self.config

        # Embedding: emb = mp_silu(mp_sum(Lin(MPFourier(c_noise)), Lin(onehot sqrt(label_dim)), 0.5)), fp32
        emb = self.emb_noise(self.emb_fourier(c_noise))  # (B,) -> (B, noise) -> (B, cemb)
        if self.emb_label is not None:
            if class_labels is None:
                raise InputError(f"class_labels: the model is conditional (label_dim {cfg.label_dim}); "
                                 "expected (B, label_dim) one-hot or (B,) integer labels")
            onehot = _one_hot(class_labels, cfg.label_dim)  # (B, label_dim)
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(cfg.label_dim)), t=cfg.label_balance)
        emb = mp_silu(emb)

        # Input: append a constant-1 channel (it replaces biases), then conv3x3
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, C, R, R) -> (B, C + 1, R, R)
        x = self.enc_conv(x)

        # Encoder: every output is a skip
        skips = [x]
        for block in self.enc:
            x = block(x, emb)
            skips.append(x)

        # Decoder: skip-fed blocks see mp_cat(x, skip, 0.5)
        for block in self.dec:
            if block.takes_skip:
                x = mp_cat(x, skips.pop(), t=cfg.concat_balance)
            x = block(x, emb)

        # Output conv with gain init 0
        return self.out_conv(x, gain=self.out_gain)


class UncertaintyHead(nn.Module):
    """u(sigma) = Lin(MPFourier_128(c_noise)), a scalar per sample, used only by the loss
    L = lambda(sigma) / e^u ||D - y||^2 + u (edm2.md §2, §4)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fourier(c_noise)).squeeze(1)  # (B,) -> (B, n) -> (B, 1) -> (B,)


def _one_hot(labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """(B,) integer classes -> (B, label_dim) float one-hot; (B, label_dim) passes through as fp32."""
    if labels.is_floating_point():
        return labels.to(torch.float32)
    classes = torch.arange(label_dim, device=labels.device)
    return (labels[:, None] == classes).to(torch.float32)  # (B,) -> (B, label_dim)


# --- Building with a seed ----------------------------------------------------------------------


def _unet_config(config: UNetConfig | Preset) -> UNetConfig:
    if isinstance(config, Preset):
        return config.unet
    if isinstance(config, UNetConfig):
        return config
    raise InputError(f"config: expected a UNetConfig or Preset (see get_preset), got {type(config).__name__}")


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, stream), so init is the same on every device and worker."""
    state = np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _build(module_cls, arg, device, seed: int, stream: int) -> nn.Module:
    with torch.device("meta"):
        module = module_cls(arg)
    device = torch.device(device)
    if device.type == "meta":
        return module
    module = module.to_empty(device=device)
    generator = _generator(seed, stream)
    for m in module.modules():  # registration order: the same draws for the same seed
        if hasattr(m, "reset_parameters"):
            m.reset_parameters(generator)
    return module


def build_unet(config: UNetConfig | Preset, *, device: str | torch.device = "cpu", seed: int = 0) -> UNet:
    """Build F with fp32 weights on `device`, initialised from `seed` (drawn on the CPU, so the same
    seed gives the same weights on any device). device="meta" builds shapes only (for counting)."""
    return _build(UNet, _unet_config(config), device, seed, stream=0)


def build_uncertainty_head(config: UNetConfig | Preset, *, device: str | torch.device = "cpu",
                           seed: int = 0) -> UncertaintyHead:
    """Build u(sigma) of width config.logvar_channels, initialised from `seed` (independent of F's)."""
    return _build(UncertaintyHead, _unet_config(config).logvar_channels, device, seed, stream=1)
