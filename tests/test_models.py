"""lossfloor.models: EDM2 U-Net against EDM2's published sizes and the magnitude-preserving design.

Oracles: EDM2's parameter counts (paper Table 2, and edm2.md §2 "A, matches P"); GMAC per evaluation
(edm2.md §3: our own count 45.0/100.8/178.9/279.3/401.9/546.8; the paper's Gflops, a multiply-add
counted once, ~1% above); unit-variance inputs stay unit-variance through mp_* ops; F = 0 at init.
Big presets are built on the meta device only. Set LOSSFLOOR_TEST_COMPILE=1 to also run the
inductor compile test (about 1.5 min on 2 busy CPU cores).
"""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from lossfloor.cli import main
from lossfloor.errors import InputError
from lossfloor.models import (
    PRESETS,
    Block,
    MPConv,
    MPFourier,
    UNetConfig,
    build_uncertainty_head,
    build_unet,
    count_params,
    force_weight_norm_,
    get_preset,
    gmac_per_eval,
    mp_cat,
    mp_silu,
    mp_sum,
    params_of,
    set_forced_wn,
)

# name: (Mparams from EDM2, GMAC from the brief / paper, GMAC of edm2.md's own count, exact params of F)
EDM2_SIZES = {
    "img512-xs": (124.7, 45.5, 45.0, 124_713_125),
    "img512-s": (280.2, 101.9, 100.8, 280_212_709),
    "img512-m": (497.8, 180.8, 178.9, 497_807_653),
    "img512-l": (777.5, 282.1, 279.3, 777_497_957),
    "img512-xl": (1119.3, 405.9, 401.9, 1_119_283_621),
    "img512-xxl": (1523.2, 552.1, 546.8, 1_523_164_645),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(cfg: UNetConfig, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g)
    c_noise = torch.randn(n, generator=g)
    labels = torch.randint(0, cfg.label_dim, (n,), generator=g)
    return x, c_noise, labels


def _waken(net):
    """Non-zero gains (init 0 makes F identically 0), so outputs depend on every layer."""
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if isinstance(m, Block):
                m.emb_gain.fill_(0.5)
    return net


# --- Sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EDM2_SIZES))
def test_params_match_edm2(name):
    mparams, _, _, exact = EDM2_SIZES[name]
    n_unet = params_of(get_preset(name), uncertainty_head=False)
    n_all = params_of(get_preset(name), uncertainty_head=True)
    assert n_unet == exact  # golden: guards the architecture against silent changes
    assert n_all == n_unet + 128  # u(sigma) = Lin(MPFourier_128): 128 weights, no bias
    # Both round to EDM2's figure: 128 parameters are invisible at 0.1 M resolution.
    for n in (n_unet, n_all):
        assert abs(n / 1e6 - mparams) / mparams < 1e-3
        assert round(n / 1e6, 1) == mparams


@pytest.mark.parametrize("name", list(EDM2_SIZES))
def test_gmac_per_eval(name):
    _, gmac_paper, gmac_edm2md, _ = EDM2_SIZES[name]
    g = gmac_per_eval(get_preset(name), convention="gemm")
    assert abs(g - gmac_edm2md) <= 0.11  # edm2.md's own count, given to 0.1 GMAC
    # EDM2's published count (the paper's Gflops) within 1%, with the per-forward weight normalisation
    g_edm2 = gmac_per_eval(get_preset(name))
    assert abs(g_edm2 - gmac_paper) / gmac_paper < 0.01


def test_gmac_counts_attention():
    """Removing attention lowers the count by the QK and AV matmuls (plus qkv/proj 1x1 convs)."""
    cfg = get_preset("img512-xs").unet
    no_attn = dataclasses.replace(cfg, attn_resolutions=())
    assert gmac_per_eval(no_attn) < gmac_per_eval(cfg) - 0.38  # bmm alone: 0.386 GMAC


@pytest.mark.parametrize("width", ["s", "m", "l", "xl"])
def test_img64_params_equal_img512(width):
    """Same width, same count, but for the 3- vs 4-channel input conv (+1 constant channel) and output
    conv: 9 mc fewer weights each."""
    big, small = get_preset(f"img512-{width}"), get_preset(f"img64-{width}")
    mc = small.unet.model_channels
    assert mc == big.unet.model_channels
    n64, n512 = params_of(small), params_of(big)
    assert n512 - n64 == 18 * mc
    assert abs(n64 - n512) / n512 < 1e-3


def test_presets_recipes():
    xs, xxl, s64 = get_preset("img512-xs"), get_preset("img512-xxl"), get_preset("img64-s")
    assert (xs.lr_ref, xs.t_ref_iters, xs.duration_n_img, xs.P_mean, xs.P_std) == (0.012, 70_000, 2048 << 20, -0.4, 1.0)
    assert (xxl.unet.dropout, xxl.duration_n_img) == (0.1, 896 << 20)
    assert (s64.t_ref_iters, s64.P_mean, s64.P_std, s64.unet.img_channels) == (35_000, -0.8, 1.6, 3)
    for p in PRESETS.values():
        assert dataclasses.is_dataclass(p) and p.name in PRESETS
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.lr_ref = 1.0


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(InputError, match=r"img512-xs.*tiny32"):
        get_preset("img512-xxxl")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(img_resolution=12), "img_resolution"),  # 4 levels need a multiple of 8
        (dict(attn_resolutions=(5,)), "attn_resolutions"),
        (dict(channels_per_head=48), "channels_per_head"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(label_dim=-1), "label_dim"),
    ],
)
def test_config_validation_names_the_field(change, field):
    base = dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128)
    with pytest.raises(InputError, match=f"^{field}:"):
        UNetConfig(**{**base, **change})


# --- Magnitude preservation -----------------------------------------------------------------------


def _rms(x):
    return x.square().mean().sqrt().item()


def test_mp_ops_preserve_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 400_000, generator=g)
    assert _rms(mp_silu(a)) == pytest.approx(1.0, abs=0.01)  # 0.596 = rms of silu(N(0, 1))
    for t in (0.3, 0.5, 0.8):
        assert _rms(mp_sum(a, b, t)) == pytest.approx(1.0, abs=0.01)
    xa, xb = torch.randn(256, 96, 64, generator=g), torch.randn(256, 32, 64, generator=g)
    for t in (0.3, 0.5):
        y = mp_cat(xa, xb, t)
        assert y.shape == (256, 128, 64)
        assert _rms(y) == pytest.approx(1.0, abs=0.01)
        # the balance t sets each part's share of the magnitude: ((1-t)^2 : t^2)
        share_b = y[:, 96:].square().sum() / y.square().sum()
        assert share_b.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=0.01)
    assert _rms(MPFourier(512)(torch.randn(4096, generator=g))) == pytest.approx(1.0, abs=0.02)


def test_mpconv_preserves_magnitude_and_filters_have_unit_norm():
    torch.manual_seed(0)
    for conv, x in [(MPConv(64, 32), torch.randn(20_000, 64)), (MPConv(16, 24, (3, 3)), torch.randn(64, 16, 32, 32))]:
        w = conv.effective_weight().detach()
        assert (w.flatten(1).norm(dim=1) - 1).abs().max() < 2e-4  # N's eps: rms(N(W)) = 1 - O(1e-4)
        with torch.no_grad():
            y = conv(x)
        inner = y if y.ndim == 2 else y[:, :, 1:-1, 1:-1]  # zero padding shrinks the border
        assert _rms(inner) == pytest.approx(1.0, abs=0.03)


def test_block_and_unet_keep_activations_near_unit_magnitude():
    net = _waken(build_unet(get_preset("tiny"), seed=0)).eval()
    x, c_noise, labels = _batch(net.config, n=32)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(_rms(o))) for b in net.enc]
    with torch.no_grad():
        net(x, c_noise, labels)
    for h in hooks:
        h.remove()
    assert all(0.5 < r < 2.0 for r in seen), seen


# --- Forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny32"])
def test_output_shape_and_exactly_zero_at_init(name):
    net = build_unet(get_preset(name), seed=0)
    x, c_noise, labels = _batch(net.config, n=3)
    y = net(x, c_noise, labels)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.count_nonzero(y) == 0  # output gain init 0
    u = build_uncertainty_head(get_preset(name), seed=0)(c_noise)
    assert u.shape == (3,)


def test_labels_integer_equals_one_hot_and_unconditional_runs():
    net = _waken(build_unet(get_preset("tiny"), seed=0)).eval()
    x, c_noise, labels = _batch(net.config)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        assert torch.equal(net(x, c_noise, labels), net(x, c_noise, onehot))
    with pytest.raises(InputError, match="class_labels"):
        net(x, c_noise)
    uncond = build_unet(dataclasses.replace(net.config, label_dim=0), seed=0)
    assert uncond.emb_label is None
    assert count_params(net) - count_params(uncond) == 10 * net.config.emb_channels
    assert uncond(x, c_noise).shape == x.shape


def test_bf16_forward_follows_fp32():
    net = _waken(build_unet(get_preset("tiny"), seed=0)).eval()
    x, c_noise, labels = _batch(net.config)
    with torch.no_grad():
        y32 = net(x, c_noise, labels)
        y16 = net(x.bfloat16(), c_noise, labels)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() / y32.norm() < 0.05


# --- Init ----------------------------------------------------------------------------------------


def test_init_is_deterministic_under_a_seed():
    a, b, c = (build_unet(get_preset("tiny"), seed=s).state_dict() for s in (7, 7, 8))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["enc_conv.weight"], c["enc_conv.weight"])
    assert "emb_fourier.freqs" in a and "emb_fourier.phases" in a  # buffers travel with checkpoints
    head = build_uncertainty_head(get_preset("tiny"), seed=7).state_dict()
    assert not torch.equal(head["fourier.freqs"][:32], a["emb_fourier.freqs"][:32])  # independent streams
    meta = build_unet(get_preset("img512-xxl"), device="meta")
    assert all(p.is_meta for p in meta.parameters())


# --- Training ------------------------------------------------------------------------------------


def _filter_rms(net):
    return torch.cat([m.weight.detach().flatten(1).norm(dim=1) / math.sqrt(m.fan_in)
                      for m in net.modules() if isinstance(m, MPConv)])


def test_forced_weight_norm_after_an_optimizer_step():
    net = build_unet(get_preset("tiny"), seed=0).train()
    head = build_uncertainty_head(get_preset("tiny"), seed=0).train()
    x, c_noise, labels = _batch(net.config)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=0.1)
    for _ in range(2):  # step 1 only moves the zero gains; step 2 moves every weight
        loss = (net(x, c_noise, labels) - x).square().mean() + head(c_noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (_filter_rms(net) - 1).abs().max() > 0.01  # the step moved W off the sphere
    with torch.no_grad():
        net(x, c_noise, labels)
        head(c_noise)
    # ||W_filter|| = sqrt(fan_in) (rms 1, up to N's eps 1e-4) again: the training forward re-normalised W
    assert (_filter_rms(net) - 1).abs().max() < 2e-4
    assert (_filter_rms(head) - 1).abs().max() < 2e-4


def test_once_per_step_weight_norm_equals_per_forward():
    a = _waken(build_unet(get_preset("tiny"), seed=0)).train()
    b = _waken(build_unet(get_preset("tiny"), seed=0)).train()
    with torch.no_grad():
        for m in (*a.modules(), *b.modules()):
            if isinstance(m, MPConv):
                m.weight.mul_(3.0)  # as after an optimizer step: off the sphere
    set_forced_wn(b, False)
    force_weight_norm_(b)
    x, c_noise, labels = _batch(a.config)
    ya, yb = a(x, c_noise, labels), b(x, c_noise, labels)
    assert torch.allclose(ya, yb, atol=1e-6)
    assert torch.allclose(_filter_rms(a), _filter_rms(b), atol=1e-6)


def test_tiny_trains_on_cpu():
    """EDM2 loss (edm2.md §4) with the uncertainty head on one fixed batch: it goes down in a few steps."""
    preset = get_preset("tiny")
    net = build_unet(preset, seed=0).train()
    head = build_uncertainty_head(preset, seed=0).train()
    g = torch.Generator().manual_seed(0)
    y, _, labels = _batch(preset.unet, n=32)
    y = 0.5 * y  # sigma_data = 0.5
    sigma = (torch.randn(32, generator=g) * preset.P_std + preset.P_mean).exp()[:, None, None, None]
    noisy = y + sigma * torch.randn(y.shape, generator=g)
    sd = preset.sigma_data
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sigma**2 + sd**2).sqrt(), sigma.flatten().log() / 4
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=0.01, betas=preset.adam_betas)
    losses = []
    for _ in range(8):
        denoised = c_skip * noisy + c_out * net(c_in * noisy, c_noise, labels)
        weighted = ((denoised - y) / c_out).square().sum(dim=(1, 2, 3))  # lambda = 1/c_out^2, summed over C,H,W
        u = head(c_noise)
        loss = (weighted / u.exp() + u).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


# --- torch.compile ---------------------------------------------------------------------------------


def test_forward_traces_without_graph_breaks():
    """fullgraph=True raises on any graph break; training mode covers forced WN and dropout."""
    import torch._dynamo

    cfg = dataclasses.replace(get_preset("tiny").unet, dropout=0.1)
    net = build_unet(cfg, seed=0).train()
    x, c_noise, labels = _batch(cfg)
    torch._dynamo.reset()
    try:
        out = torch.compile(net, fullgraph=True, backend="eager")(x, c_noise, labels)
        out.square().mean().backward()
    finally:
        torch._dynamo.reset()
    assert out.shape == x.shape


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's inductor backend needs a C compiler")
def test_compiled_matches_eager():
    import torch._dynamo

    net = _waken(build_unet(get_preset("tiny"), seed=0)).eval()
    x, c_noise, labels = _batch(net.config, n=8)
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        torch._dynamo.reset()
        try:
            out = torch.compile(net, fullgraph=True)(x, c_noise, labels)
        finally:
            torch._dynamo.reset()
    assert (out - ref).abs().max().item() < 1e-5


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_model_info_json(capsys):
    assert main(["model-info", "--preset", "img512-xs", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == EDM2_SIZES["img512-xs"][3] + 128
    assert info["gmac_per_eval"] == pytest.approx(44.95 + 3 * 124_713_125e-9, abs=0.01)  # EDM2 convention
    assert (info["resolution"], info["channels"], info["label_dim"], info["mc"]) == (64, 4, 1000, 128)


def test_cli_model_info_table(capsys):
    assert main(["model-info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "gmac_per_eval" in out and "resolution       8" in out


def test_cli_model_info_unknown_preset(capsys):
    assert main(["model-info", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--preset" in err and "img512-xs" in err and "tiny" in err
