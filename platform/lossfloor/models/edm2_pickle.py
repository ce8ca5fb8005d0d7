"""NVIDIA's published EDM2 network pickles, read into our U-Net without running any code they contain.

EDM2 writes `network-snapshot-{kimg:07d}-{ema_std:.3f}.pkl` during training and post-hoc EMA
reconstructions `edm2-img512-{size}-{kimg:07d}-{std:.3f}.pkl`, both with `pickle.dump` of a dict whose
`ema` entry is the network (EDM2's Precond: the preconditioning, the U-Net and the uncertainty head). Its
modules are EDM2 "persistent" objects: each pickles as a call of `torch_utils.persistence.
_reconstruct_persistent_obj(meta)`, meta = {type, version, module_src, class_name, state}, where module_src is
the Python source of EDM2's module (unpickling normally executes it) and state the module's `__dict__`:
`_parameters`, `_buffers`, `_modules` and the recorded constructor arguments `_init_args`, `_init_kwargs`.

`read_edm2_pickle` unpickles with a `find_class` that admits only
  - that reconstruct function, replaced by `StoredObject` (class name and state kept; module_src never run),
  - `dnnlib.util.EasyDict` (read as dict) and torch's `ModuleDict` (read as `StoredObject`),
  - what rebuilds tensors and arrays: torch._utils._rebuild_tensor_v2 / _rebuild_parameter (as plain tensors,
    without the hooks a pickle may attach), the storage bytes of torch.storage._load_from_bytes (read by
    `torch.load(weights_only=True)`), numpy's ndarray, dtype and scalar reconstruction, OrderedDict, set;
and refuses every other global with one line naming the file and the global (`InputError`).

`load_edm2_network` then builds OUR network from the recorded constructor arguments and loads the weights.
The two networks are the same function; what differs is stored differently:
  - names: EDM2's encoder `{res}x{res}_conv` is our `enc_conv`; its other encoder blocks and all decoder
    blocks (named by resolution) are ours in the same order; `logvar_fourier`/`logvar_linear` are our
    uncertainty head's `fourier`/`linear`;
  - MPFourier: EDM2 stores 2 pi f and 2 pi phi (cos(x f' + phi')), we store f and phi (cos(2 pi (x f + phi)));
  - attention qkv: EDM2 orders the 3C output rows (head, channel, {q, k, v}), we order ({q, k, v}, head, channel).
A configuration our network cannot represent exactly is refused with one line: EDM2's decoder always opens
its lowest level with an attention block (ours only when that level is attended), other resampling filters
than [1, 1] (2x2 average pool / nearest), unknown constructor arguments.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.models.config import UNetConfig
from lossfloor.models.unet import UncertaintyHead, UNet, build_uncertainty_head, build_unet

RAW_NAME = re.compile(r"network-snapshot-(\d+)-(\d+\.\d+)\.pkl")  # EDM2 training snapshots
POSTHOC_NAME = re.compile(r"(edm2-.+)-(\d+)-(\d+\.\d+)\.pkl")  # EDM2 post-hoc reconstructions (published)


@dataclass
class StoredObject:
    """An EDM2 persistent object (or a torch ModuleDict) as stored: its class name and state, nothing run."""

    class_name: str
    state: dict

    def __setstate__(self, state):  # a ModuleDict is rebuilt as cls.__new__(cls) then BUILD(state)
        self.class_name, self.state = "ModuleDict", dict(state)


def _persistent(meta) -> StoredObject:
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: keeps meta, runs nothing."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistent object without a state dict")
    return StoredObject(class_name=str(meta.get("class_name")), state=meta["state"])


class _ModuleDict(StoredObject):
    """torch's ModuleDict as stored (pickle creates it with __new__ and sets its state)."""


def _storage(data: bytes):
    """torch.storage._load_from_bytes, with torch's own restricted (weights-only) unpickler."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 of a storage, without the hooks or metadata a pickle may attach."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor of a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _parameter(data, requires_grad=False, backward_hooks=None, *state):
    """torch._utils._rebuild_parameter as its tensor alone (its hooks are never kept)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter of a {type(data).__name__}, not a tensor")
    return data


def _ndarray(subtype, shape, dtype):
    """numpy's _reconstruct for plain arrays only (the state that BUILD sets is data, not code)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _scalar(dtype, data=None):
    """numpy's scalar reconstruction for plain (non-object) dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype)[0]


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class _Refused(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids (torch.save files are not EDM2 network pickles)")


def read_edm2_pickle(path: str | os.PathLike):
    """The objects of an EDM2 pickle (module docstring), read without running any code from it.
    InputError naming the file: a refused global, or a file that is no pickle."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except _Refused as e:
        raise InputError(f"{path}: refused global {e} (an EDM2 network pickle holds only tensors, containers and "
                         "EDM2's persistent objects; nothing from this file was run)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # a corrupt or foreign pickle: pickle and torch raise many types
        raise InputError(f"{path}: not an EDM2 network pickle ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None


# --- Our network from the stored one ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EDM2Network:
    """An EDM2 network in our modules: F (`net`, eval mode, fp32), u(sigma) (`head`) and sigma_data of its
    EDM preconditioning (edm2.md §2: c_noise = ln(sigma) / 4)."""

    net: UNet
    head: UncertaintyHead
    config: UNetConfig
    sigma_data: float
    use_fp16: bool  # EDM2 ran F in fp16 on CUDA
    loss: tuple[float, float] | None  # (P_mean, P_std) of the stored training loss, None when absent


UNET_DEFAULTS = {"model_channels": 192, "channel_mult": (1, 2, 3, 4), "channel_mult_noise": None,
                 "channel_mult_emb": None, "num_blocks": 3, "attn_resolutions": (16, 8), "label_balance": 0.5,
                 "concat_balance": 0.5, "resample_filter": (1, 1), "channels_per_head": 64, "dropout": 0.0,
                 "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256}  # EDM2's UNet / Block defaults
PRECOND_KEYS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")


def load_edm2_network(path: str | os.PathLike, *, device="cpu") -> EDM2Network:
    """Our network with the weights of the EDM2 pickle at `path` (its `ema` network; module docstring).
    InputError naming the file: not an EDM2 network pickle, or a configuration ours cannot represent."""
    path = Path(path)
    top = read_edm2_pickle(path)
    precond = top.get("ema") if isinstance(top, dict) else None
    if not (isinstance(precond, StoredObject) and precond.class_name == "Precond"):
        got = sorted(map(str, top)) if isinstance(top, dict) else type(top).__name__
        raise InputError(f"{path}: expected EDM2's dict with an 'ema' Precond network (network-snapshot-*.pkl or a "
                         f"post-hoc edm2-*.pkl), got {got}")
    unet = _modules(precond, path).get("unet")
    if not (isinstance(unet, StoredObject) and unet.class_name == "UNet"):
        raise InputError(f"{path}: the Precond network has no stored UNet")
    p_args = _init_args(precond, path, ("img_resolution", "img_channels", "label_dim"))
    config = unet_config(_init_args(unet, path, ("img_resolution", "img_channels", "label_dim")), path,
                         logvar_channels=int(p_args.get("logvar_channels", 128)))
    sigma_data = float(p_args.get("sigma_data", 0.5))
    weights = _flatten(precond, path)
    net_state, head_state = convert_weights(weights, config, path)
    net, head = build_unet(config, device="meta"), build_uncertainty_head(config, device="meta")
    for module, state, what in ((net, net_state, "UNet"), (head, head_state, "uncertainty head")):
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise InputError(f"{path}: the stored {what} does not match its recorded constructor arguments "
                             f"({str(e).splitlines()[0][:200]})") from None
    loss = top.get("loss_fn")
    loss = loss.state if isinstance(loss, StoredObject) else {}
    lognormal = all(isinstance(loss.get(k), (int, float)) for k in ("P_mean", "P_std"))
    return EDM2Network(net=net.to(device).eval(), head=head.to(device).eval(), config=config, sigma_data=sigma_data,
                       use_fp16=bool(p_args.get("use_fp16", True)),
                       loss=(float(loss["P_mean"]), float(loss["P_std"])) if lognormal else None)


def unet_config(kwargs: dict, path, *, logvar_channels: int) -> UNetConfig:
    """Our UNetConfig of EDM2's UNet(**kwargs) (module docstring), InputError where ours differs."""
    unknown = sorted(set(kwargs) - set(UNET_DEFAULTS) - {"img_resolution", "img_channels", "label_dim"})
    if unknown:
        raise InputError(f"{path}: UNet argument {unknown[0]}={kwargs[unknown[0]]!r} has no counterpart in "
                         "lossfloor's network")
    a = {**UNET_DEFAULTS, **kwargs}
    mult = tuple(int(m) for m in a["channel_mult"])
    if tuple(a["resample_filter"]) != (1, 1):
        raise InputError(f"{path}: resample_filter {list(a['resample_filter'])} (lossfloor's network resamples "
                         "with [1, 1]: 2x2 average pool and nearest)")
    res = [int(a["img_resolution"]) >> level for level in range(len(mult))]
    attn = tuple(r for r in (int(r) for r in a["attn_resolutions"]) if r in res)  # others attend nowhere
    if res[-1] not in attn:
        raise InputError(f"{path}: EDM2's decoder attends at the lowest resolution {res[-1]}, which is not in "
                         f"attn_resolutions {list(a['attn_resolutions'])}; lossfloor's network attends only there")
    clip = a["clip_act"]
    try:
        return UNetConfig(
            img_resolution=int(a["img_resolution"]), img_channels=int(a["img_channels"]),
            label_dim=int(a["label_dim"]), model_channels=int(a["model_channels"]), channel_mult=mult,
            num_blocks=int(a["num_blocks"]), attn_resolutions=attn, channels_per_head=int(a["channels_per_head"]),
            emb_mult=int(a["channel_mult_emb"] if a["channel_mult_emb"] is not None else max(mult)),
            noise_mult=int(a["channel_mult_noise"] if a["channel_mult_noise"] is not None else mult[0]),
            dropout=float(a["dropout"]), label_balance=float(a["label_balance"]),
            concat_balance=float(a["concat_balance"]), res_balance=float(a["res_balance"]),
            attn_balance=float(a["attn_balance"]), clip_act=math.inf if clip is None else float(clip),
            logvar_channels=logvar_channels,
        )
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def edm2_block_names(config: UNetConfig) -> tuple[list[str], list[str]]:
    """EDM2's names of the encoder and decoder entries, in order (the encoder's first is the input conv)."""
    enc, dec = [], []
    for level, res in enumerate(config.resolutions):
        enc.append(f"{res}x{res}_conv" if level == 0 else f"{res}x{res}_down")
        enc += [f"{res}x{res}_block{i}" for i in range(config.num_blocks)]
    for level in reversed(range(len(config.resolutions))):
        res = config.resolutions[level]
        dec += [f"{res}x{res}_in0", f"{res}x{res}_in1"] if level == len(config.resolutions) - 1 else [f"{res}x{res}_up"]
        dec += [f"{res}x{res}_block{i}" for i in range(config.num_blocks + 1)]
    return enc, dec


def convert_weights(weights: dict[str, torch.Tensor], config: UNetConfig, path) -> tuple[dict, dict]:
    """(our UNet state dict, our uncertainty head state dict), fp32, from EDM2's Precond weights (module
    docstring: names, Fourier features / 2 pi, qkv row order)."""
    enc, dec = edm2_block_names(config)
    rename = {f"unet.enc.{enc[0]}.": "enc_conv."}
    rename.update({f"unet.enc.{name}.": f"enc.{i}." for i, name in enumerate(enc[1:])})
    rename.update({f"unet.dec.{name}.": f"dec.{i}." for i, name in enumerate(dec)})
    net_state, head_state = {}, {}
    for name, value in weights.items():
        value = value.detach().to(torch.float64)
        if name.startswith(("logvar_fourier.", "logvar_linear.")):
            out, key = head_state, name.replace("logvar_", "", 1)
        elif name.startswith("unet."):
            prefix = next((p for p in rename if name.startswith(p)), None)
            out, key = net_state, (rename[prefix] + name[len(prefix):] if prefix else name[len("unet."):])
            if name.startswith(("unet.enc.", "unet.dec.")) and prefix is None:
                raise InputError(f"{path}: stored block {name} is not one of EDM2's blocks of its recorded "
                                 f"configuration ({', '.join(enc[:3])}, ...)")
        else:
            raise InputError(f"{path}: stored tensor {name} is not part of EDM2's Precond network")
        if key.endswith(("fourier.freqs", "fourier.phases")):
            value = value / (2 * math.pi)
        elif key.endswith("attn_qkv.weight"):
            value = _qkv_rows(value, config.channels_per_head)
        out[key] = value.to(torch.float32)
    return net_state, head_state


def _qkv_rows(w: torch.Tensor, channels_per_head: int) -> torch.Tensor:
    """EDM2's qkv rows (head, channel, {q,k,v}) -> ours ({q,k,v}, head, channel); w: (3C, C, 1, 1)."""
    c = w.shape[0] // 3
    heads = c // channels_per_head
    return w.reshape(heads, channels_per_head, 3, *w.shape[1:]).movedim(2, 0).reshape(w.shape)


def _modules(obj: StoredObject, path) -> dict:
    mods = obj.state.get("_modules", {})
    if not isinstance(mods, dict):
        raise InputError(f"{path}: stored {obj.class_name} has no module table")
    return mods


def _init_args(obj: StoredObject, path, positional: tuple[str, ...]) -> dict:
    """The recorded constructor arguments of a persistent object, as keywords."""
    args, kwargs = obj.state.get("_init_args") or (), obj.state.get("_init_kwargs") or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or len(args) > len(positional):
        raise InputError(f"{path}: stored {obj.class_name} has no usable recorded constructor arguments")
    return {**dict(zip(positional, args)), **kwargs}


def _flatten(obj: StoredObject, path, prefix: str = "") -> dict[str, torch.Tensor]:
    """name -> tensor of every parameter and buffer under `obj`, named as torch's state_dict would."""
    out = {}
    for table in ("_parameters", "_buffers"):
        for name, value in (obj.state.get(table) or {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise InputError(f"{path}: stored {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in _modules(obj, path).items():
        if child is None:
            continue
        if not isinstance(child, StoredObject):
            raise InputError(f"{path}: stored module {prefix}{name} is a {type(child).__name__}")
        out.update(_flatten(child, path, f"{prefix}{name}."))
    return out


def snapshot_info(path: str | os.PathLike) -> tuple[str | None, int, float]:
    """(model name or None, thousands of training images, EMA std) from an EDM2 file name:
    network-snapshot-{kimg}-{std}.pkl (raw) or {name}-{kimg}-{std}.pkl, e.g. edm2-img512-xs-2147483-0.135.pkl.
    InputError for another name."""
    name = Path(path).name
    raw = RAW_NAME.fullmatch(name)
    if raw:
        return None, int(raw.group(1)), float(raw.group(2))
    post = POSTHOC_NAME.fullmatch(name)
    if post:
        return post.group(1), int(post.group(2)), float(post.group(3))
    raise InputError(f"{path}: expected an EDM2 file name network-snapshot-KIMG-STD.pkl or edm2-NAME-KIMG-STD.pkl")


__all__ = ["EDM2Network", "StoredObject", "convert_weights", "edm2_block_names", "load_edm2_network",
           "read_edm2_pickle", "snapshot_info", "unet_config"]
