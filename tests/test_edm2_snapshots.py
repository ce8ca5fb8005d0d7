"""EDM2 network pickles: our network -> pickle in the published layout (tests/edm2_pickles.py) -> our importer
-> the same function; hostile pickles refused with one line and nothing run."""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import replace

import pytest
import torch

import edm2_pickles as E
from lossfloor.errors import InputError
from lossfloor.models import build_uncertainty_head, build_unet, get_preset
from lossfloor.models.edm2_pickle import load_edm2_network, read_edm2_pickle, snapshot_info


def tiny_models(conditional: bool, seed: int = 1):
    """The `tiny` preset's F and u(sigma) with every gain non-zero (at init F = 0 would compare nothing),
    Fourier buffers as EDM2 can store them in float32 (f = fl(fl(2 pi f) / 2 pi), see below)."""
    p = get_preset("tiny")
    cfg = p.unet if conditional else replace(p.unet, label_dim=0)
    net, head = build_unet(cfg, seed=seed), build_uncertainty_head(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.out_gain.fill_(0.7)
        for b in [*net.enc, *net.dec]:
            b.emb_gain.copy_(torch.rand([], generator=g) + 0.2)
        for f in (net.emb_fourier, head.fourier):
            # EDM2 stores 2 pi f: a float32 f and its stored value map onto each other exactly only for
            # some f; take those, so the round trip can be compared bit for bit
            for buf in (f.freqs, f.phases):
                buf.copy_((buf.double() * 2 * math.pi).float().double().div(2 * math.pi).float())
    return net.eval(), head.eval()


def inputs(cfg, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g)
    c_noise = torch.log(torch.exp(torch.randn(n, generator=g) * 1.2 - 0.4)) / 4  # ln sigma / 4
    labels = torch.randint(0, cfg.label_dim, (n,), generator=g) if cfg.label_dim else None
    return x, c_noise, labels


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_round_trip_same_outputs(tmp_path, conditional):
    net, head = tiny_models(conditional)
    path = tmp_path / "network-snapshot-0001024-0.100.pkl"
    E.write_snapshot(path, net, head, sigma_data=0.5)
    got = load_edm2_network(path)
    assert got.config == net.config and got.sigma_data == 0.5 and not E.CALLS
    x, c, lab = inputs(net.config)
    with torch.no_grad():
        want, out = net(x, c, lab), got.net(x, c, lab)
        assert want.abs().max() > 0.1  # a network that computes something
        assert (out - want).abs().max() <= 1e-6 * want.abs().max()
        assert (got.head(c) - head(c)).abs().max() <= 1e-6 * head(c).abs().max()


def test_published_float16_weights_read_as_stored(tmp_path):
    """EDM2 stores its EMA networks in float16: every tensor is read as stored, converted as documented."""
    net, head = tiny_models(conditional=True)
    path = tmp_path / "edm2-img512-xs-0002048-0.135.pkl"
    E.write_snapshot(path, net, head, dtype=torch.float16)
    got = load_edm2_network(path).net
    assert torch.equal(got.out_conv.weight, net.out_conv.weight.half().float())
    assert torch.equal(got.enc[0].conv_res0.weight, net.enc[0].conv_res0.weight.half().float())
    stored = (net.emb_fourier.freqs.double() * 2 * math.pi).half().double()
    assert torch.allclose(got.emb_fourier.freqs.double(), stored / (2 * math.pi), rtol=1e-7, atol=0)
    blk = next(b for b in got.dec if b.num_heads)
    ref = next(b for b in net.dec if b.num_heads)
    assert torch.equal(blk.attn_qkv.weight, ref.attn_qkv.weight.half().float())


def _edm2_attention(x, qkv_weight, heads: int):
    """EDM2's attention as its paper describes it, on the qkv weight in EDM2's row order (head, channel,
    {q,k,v}): per head, N over channels of q, k, v per pixel, softmax(q.k / sqrt(channels)), weighted v."""
    n, c, h, w = x.shape
    fan_in = qkv_weight[0].numel()
    wn = qkv_weight / (1e-4 + qkv_weight.flatten(1).square().mean(1).sqrt()).view(-1, 1, 1, 1) / math.sqrt(fan_in)
    y = torch.nn.functional.conv2d(x, wn).reshape(n, heads, c // heads, 3, h * w)
    y = y / (1e-4 + y.square().mean(2, keepdim=True).sqrt())
    q, k, v = y.unbind(3)  # (n, heads, ch, hw)
    a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(c // heads)).softmax(dim=3)
    return torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c, h, w)


def test_stored_layout_is_edm2s():
    """The helper's layout checked against EDM2's own formulas: its attention on the stored qkv rows and
    its Fourier features sqrt(2) cos(x f' + phi') on the stored 2 pi f, 2 pi phi equal ours."""
    net, head = tiny_models(conditional=False)
    pre = E.edm2_precond(net, head)
    blk = next(b for b in net.dec if b.num_heads)
    stored = next(m for m in pre.unet.dec.values() if m.attn_qkv is not None).attn_qkv.weight
    x = torch.randn(2, blk.attn_qkv.in_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = blk._attention(x)
        theirs = blk.attn_proj(_edm2_attention(x, stored, blk.num_heads))
        assert (ours - theirs).abs().max() < 1e-5
        c = torch.linspace(-2, 2, 7)
        f = pre.unet.emb_fourier
        assert (torch.cos(torch.outer(c, f.freqs) + f.phases) * math.sqrt(2) - net.emb_fourier(c)).abs().max() < 1e-5


def test_snapshot_names():
    assert snapshot_info("a/network-snapshot-0008388-0.050.pkl") == (None, 8388, 0.05)
    assert snapshot_info("edm2-img512-xs-2147483-0.135.pkl") == ("edm2-img512-xs", 2147483, 0.135)
    with pytest.raises(InputError, match="expected an EDM2 file name"):
        snapshot_info("model.pkl")


# --- Refused -------------------------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _touch(path: str) -> None:  # a function of a module an EDM2 pickle never names
    open(path, "w").close()


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "unknown module", "inside a snapshot"])
def test_malicious_pickle_refused_nothing_run(tmp_path, case):
    marker = tmp_path / "ran"
    path = tmp_path / "network-snapshot-0000000-0.100.pkl"
    if case == "os.system":
        obj, refused = _Reduce(os.system, (f"touch {marker}",)), "system"
    elif case == "builtins.eval":
        obj, refused = _Reduce(eval, (f"open({str(marker)!r}, 'w')",)), "builtins.eval"
    elif case == "unknown module":
        obj, refused = {"ema": _Reduce(_touch, (str(marker),))}, f"{__name__}._touch"
    if case == "inside a snapshot":  # EDM2's real layout, one hostile object beside the network
        net, head = tiny_models(conditional=False)
        with E.edm2_modules():
            obj = E.EasyDict(ema=E.edm2_precond(net, head), loss_fn=_Reduce(os.system, (f"touch {marker}",)))
            path.write_bytes(pickle.dumps(obj))
        refused = "system"
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(InputError) as e:
        load_edm2_network(path)
    msg = _one_line(e)
    assert str(path) in msg and "refused global" in msg and refused in msg
    assert not marker.exists() and not E.CALLS


def test_persistent_objects_are_not_reconstructed(tmp_path):
    """EDM2's reconstruct function (which would run the pickled module source) is never called."""
    net, head = tiny_models(conditional=True)
    path = tmp_path / "network-snapshot-0000512-0.100.pkl"
    E.write_snapshot(path, net, head)
    top = read_edm2_pickle(path)
    assert sorted(top) == ["dataset_kwargs", "ema", "encoder", "loss_fn"]
    assert top["ema"].class_name == "Precond" and top["loss_fn"].state["P_mean"] == -0.4
    assert not E.CALLS


@pytest.mark.parametrize("kwargs, expected", [
    ({"attn_resolutions": [8]}, "attends at the lowest resolution 4"),
    ({"resample_filter": [1, 3, 3, 1]}, "resample_filter [1, 3, 3, 1]"),
    ({"channel_mult_extra": 2}, "channel_mult_extra=2 has no counterpart"),
])
def test_unrepresentable_configuration_refused(tmp_path, kwargs, expected):
    net, head = tiny_models(conditional=False)
    path = tmp_path / "network-snapshot-0000512-0.100.pkl"
    E.write_snapshot(path, net, head, unet_kwargs=kwargs)
    with pytest.raises(InputError) as e:
        load_edm2_network(path)
    msg = _one_line(e)
    assert msg.startswith(str(path)) and expected in msg


@pytest.mark.parametrize("content, expected", [
    (pickle.dumps({"net": 1}), "expected EDM2's dict with an 'ema' Precond network"),
    (pickle.dumps({"ema": 1})[:-3], "not an EDM2 network pickle"),
    (b"", "not an EDM2 network pickle"),
], ids=["no ema", "truncated", "empty"])
def test_not_a_snapshot(tmp_path, content, expected):
    path = tmp_path / "x.pkl"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_edm2_network(path)
    assert expected in _one_line(e)
