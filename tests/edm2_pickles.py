"""EDM2 network pickles in the published layout, written from our own networks (tests only).

Written from EDM2's description of its format, not with lossfloor's importer: every EDM2 module is a
"persistent" object, a torch module whose pickle is a call of `torch_utils.persistence.
_reconstruct_persistent_obj(meta)`, meta = {type, version, module_src, class_name, state}, state the
module's own `__dict__` (`_parameters`, `_buffers`, `_modules`, the other attributes and the recorded
constructor arguments `_init_args` / `_init_kwargs`); encoder and decoder are torch ModuleDicts named by
resolution; the file is `pickle.dump` of an EasyDict with `ema` (the Precond network) beside `encoder`,
`dataset_kwargs` and `loss_fn`. EDM2's layout of the stored tensors: MPFourier stores 2 pi f and 2 pi phi,
the attention qkv rows are ordered (head, channel, {q, k, v}).

The fake modules `torch_utils.persistence` and `dnnlib.util` exist in sys.modules only while a pickle is
written (`edm2_modules`); their reconstruct function records each call in `CALLS`, so a test can check
that reading a pickle never called it.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from contextlib import contextmanager

import torch

CALLS: list = []  # every call of the fake _reconstruct_persistent_obj (it must stay empty when we read)
MODULE_SRC = "# EDM2's module source would be here; unpickling with EDM2's code executes it\n"


def _reconstruct_persistent_obj(meta):
    CALLS.append(meta.get("class_name"))
    raise RuntimeError("EDM2's reconstruct function was called")


class EasyDict(dict):
    """dnnlib.util.EasyDict: a dict with attribute access (attributes are its items)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


@contextmanager
def edm2_modules():
    """`torch_utils.persistence` and `dnnlib.util` in sys.modules while the block runs."""
    pkg, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence, util.EasyDict, dnnlib.util = persistence, EasyDict, util
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    EasyDict.__module__ = "dnnlib.util"
    added = {"torch_utils": pkg, "torch_utils.persistence": persistence, "dnnlib": dnnlib, "dnnlib.util": util}
    saved = {k: sys.modules.get(k) for k in added}
    sys.modules.update(added)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent(torch.nn.Module):
    """An EDM2 persistent module: pickles as _reconstruct_persistent_obj(meta) with its __dict__ as state."""

    def __init__(self, class_name: str, init_kwargs: dict, **attrs):
        super().__init__()
        self._class_name = class_name
        self._init_args = ()
        self._init_kwargs = dict(init_kwargs)
        for k, v in attrs.items():
            setattr(self, k, v)

    def __reduce_ex__(self, protocol):
        state = dict(self.__dict__)
        del state["_class_name"]
        meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=self._class_name, state=state)
        return _reconstruct_persistent_obj, (meta,)


def _param(t: torch.Tensor, dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().to(dtype).clone(), requires_grad=False)


def mp_conv(conv, dtype, *, qkv_heads: int = 0) -> Persistent:
    w = conv.weight.detach()
    if qkv_heads:  # ours ({q,k,v}, head, channel) -> EDM2's (head, channel, {q,k,v})
        c = w.shape[0] // 3
        w = w.reshape(3, qkv_heads, c // qkv_heads, *w.shape[1:]).permute(1, 2, 0, 3, 4, 5).reshape(w.shape)
    m = Persistent("MPConv", {"in_channels": w.shape[1], "out_channels": w.shape[0], "kernel": list(w.shape[2:])},
                   out_channels=w.shape[0])
    m.weight = _param(w, dtype)
    return m


def mp_fourier(fourier, dtype) -> Persistent:
    m = Persistent("MPFourier", {"num_channels": len(fourier.freqs)})
    m.register_buffer("freqs", (fourier.freqs.to(torch.float64) * (2 * math.pi)).to(dtype))
    m.register_buffer("phases", (fourier.phases.to(torch.float64) * (2 * math.pi)).to(dtype))
    return m


def block(b, dtype, flavor: str, resample: str, attention: bool, cph: int) -> Persistent:
    m = Persistent("Block", {"in_channels": b.conv_skip.in_channels if b.conv_skip is not None
                             else b.conv_res1.in_channels, "out_channels": b.conv_res1.out_channels,
                             "emb_channels": b.emb_linear.in_channels, "flavor": flavor, "resample_mode": resample,
                             "attention": attention, "channels_per_head": cph},
                   out_channels=b.conv_res1.out_channels, flavor=flavor, resample_filter=[1, 1],
                   resample_mode=resample, num_heads=b.num_heads, dropout=b.dropout, res_balance=b.res_balance,
                   attn_balance=b.attn_balance, clip_act=b.clip_act)
    m.emb_gain = _param(b.emb_gain, dtype)
    m.conv_res0, m.emb_linear, m.conv_res1 = (mp_conv(c, dtype) for c in (b.conv_res0, b.emb_linear, b.conv_res1))
    m.conv_skip = None if b.conv_skip is None else mp_conv(b.conv_skip, dtype)
    m.attn_qkv = None if not b.num_heads else mp_conv(b.attn_qkv, dtype, qkv_heads=b.num_heads)
    m.attn_proj = None if not b.num_heads else mp_conv(b.attn_proj, dtype)
    return m


def edm2_precond(net, head, *, sigma_data: float = 0.5, dtype=torch.float32, unet_kwargs: dict | None = None):
    """EDM2's Precond holding our UNet `net` and uncertainty head `head`, in EDM2's names and layouts."""
    cfg = net.config
    kwargs = {"img_resolution": cfg.img_resolution, "img_channels": cfg.img_channels, "label_dim": cfg.label_dim,
              "model_channels": cfg.model_channels, "channel_mult": list(cfg.channel_mult),
              "num_blocks": cfg.num_blocks, "attn_resolutions": list(cfg.attn_resolutions),
              "channels_per_head": cfg.channels_per_head, "dropout": cfg.dropout,
              **({"channel_mult_emb": cfg.emb_mult} if cfg.emb_mult != max(cfg.channel_mult) else {}),
              **(unet_kwargs or {})}
    u = Persistent("UNet", kwargs, label_balance=cfg.label_balance, concat_balance=cfg.concat_balance)
    u.out_gain = _param(net.out_gain, dtype)
    u.emb_fourier = mp_fourier(net.emb_fourier, dtype)
    u.emb_noise = mp_conv(net.emb_noise, dtype)
    u.emb_label = None if net.emb_label is None else mp_conv(net.emb_label, dtype)
    enc, dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
    res = cfg.resolutions
    blocks = iter(net.enc)
    for level, r in enumerate(res):
        if level == 0:
            enc[f"{r}x{r}_conv"] = mp_conv(net.enc_conv, dtype)
        else:
            enc[f"{r}x{r}_down"] = block(next(blocks), dtype, "enc", "down", False, cfg.channels_per_head)
        for i in range(cfg.num_blocks):
            enc[f"{r}x{r}_block{i}"] = block(next(blocks), dtype, "enc", "keep", r in cfg.attn_resolutions,
                                             cfg.channels_per_head)
    blocks = iter(net.dec)
    for level in reversed(range(len(res))):
        r = res[level]
        if level == len(res) - 1:
            dec[f"{r}x{r}_in0"] = block(next(blocks), dtype, "dec", "keep", True, cfg.channels_per_head)
            dec[f"{r}x{r}_in1"] = block(next(blocks), dtype, "dec", "keep", False, cfg.channels_per_head)
        else:
            dec[f"{r}x{r}_up"] = block(next(blocks), dtype, "dec", "up", False, cfg.channels_per_head)
        for i in range(cfg.num_blocks + 1):
            dec[f"{r}x{r}_block{i}"] = block(next(blocks), dtype, "dec", "keep", r in cfg.attn_resolutions,
                                             cfg.channels_per_head)
    u.enc, u.dec = enc, dec
    u.out_conv = mp_conv(net.out_conv, dtype)
    p = Persistent("Precond", {**kwargs, "use_fp16": True, "sigma_data": sigma_data,
                               "logvar_channels": len(head.fourier.freqs)},
                   img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
                   use_fp16=True, sigma_data=sigma_data)
    p.unet = u
    p.logvar_fourier = mp_fourier(head.fourier, dtype)
    p.logvar_linear = mp_conv(head.linear, dtype)
    return p.eval().requires_grad_(False)


def write_snapshot(path, net, head, *, sigma_data: float = 0.5, dtype=torch.float32, unet_kwargs=None) -> None:
    """`path`: pickle.dump of EDM2's snapshot dict {encoder, dataset_kwargs, loss_fn, ema}."""
    with edm2_modules():
        data = EasyDict(
            encoder=Persistent("StandardRGBEncoder", {}),
            dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip",
                                    use_labels=bool(net.config.label_dim)),
            loss_fn=Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": sigma_data},
                               P_mean=-0.4, P_std=1.0, sigma_data=sigma_data),
        )
        data.ema = edm2_precond(net, head, sigma_data=sigma_data, dtype=dtype, unet_kwargs=unet_kwargs)
        with open(path, "wb") as f:
            pickle.dump(data, f)
