"""`lossfloor data encode` / `decode`: EDM2's crop rule against an independent implementation, and images
of many sizes -> a tiny random AutoencoderKL (built from a config, saved to a temporary folder) -> shards
and EDM2's layout -> estimate -> train -> decode, with the posterior checked against the VAE's own
`encode`, resumption after a kill, and Ray = local.
"""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import lossfloor.data.encoding
from cli_run import cli
from lossfloor.data import load
from lossfloor.data.image_list import list_images
from lossfloor.data.preprocess import preprocess
from lossfloor.errors import InputError
from lossfloor.jobs.encode import EncodeSpec, encode, work_path
from lossfloor.jobs.engine import Engine

R = 16  # crop size of the end-to-end tests (the tiny VAE halves it once: 8 x 8 latents)

# --- an independent implementation of the crop rule ----------------------------------------------------
# Pillow's separable resampling, written from its algorithm: per output pixel, filter weights at the input
# pixel centres within the (scaled) support, normalised, quantised to 22-bit fixed point; one pass per
# axis, each rounded (half up) and clipped to 8 bits. Pillow 13 picks which axis goes first by its own
# rule (the two orders differ by one level on some pixels): the reference gives both, and a crop must
# equal one of them bit for bit.


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _cubic(x: float) -> float:  # Keys' cubic, a = -0.5
    x = abs(x)
    if x < 1:
        return (1.5 * x - 2.5) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * -0.5 if x < 2 else 0.0


def _weights(n_in: int, n_out: int, kernel, support: float) -> np.ndarray:
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    reach = support * stretch
    w = np.zeros((n_out, n_in), dtype=np.int64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - reach + 0.5), 0), min(int(centre + reach + 0.5), n_in)
        taps = [kernel((i - centre + 0.5) * (1.0 / stretch)) for i in range(lo, hi)]
        total = 0.0
        for t in taps:
            total += t
        for i, t in zip(range(lo, hi), taps):
            v = t / total * (1 << 22)
            w[o, i] = -math.floor(-v + 0.5) if v < 0 else math.floor(v + 0.5)
    return w


def _resample(pixels: np.ndarray, size: tuple[int, int], kernel, support: float, rows_first: bool) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3), size = (w, h); rows_first: the horizontal pass first."""
    out = pixels.astype(np.int64)
    for axis, n_out in ((1, size[0]), (0, size[1])) if rows_first else ((0, size[1]), (1, size[0])):
        if out.shape[axis] != n_out:
            acc = np.moveaxis(np.tensordot(_weights(out.shape[axis], n_out, kernel, support), out, axes=(1, axis)),
                              0, axis)
            out = np.clip((acc + (1 << 21)) >> 22, 0, 255)
    return out.astype(np.uint8)


def reference_crops(pixels: np.ndarray, r: int) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> (3, r, r): halve while the short side >= 2r, bicubic to short side r, centre;
    for each order of the separable passes (each resize may take either)."""
    crops = {b"": pixels}  # bytes of the pass orders taken -> image
    while min(pixels.shape[:2]) >= 2 * r:
        size = (pixels.shape[1] // 2, pixels.shape[0] // 2)
        crops = {k + bytes([o]): _resample(p, size, _box, 0.5, bool(o)) for k, p in crops.items() for o in (0, 1)}
        pixels = next(iter(crops.values()))
    out = []
    for p in crops.values():
        h, w = p.shape[:2]
        size = (round(w * r / min(h, w)), round(h * r / min(h, w)))
        for rows_first in (True, False):
            q = _resample(p, size, _cubic, 2.0, rows_first)
            top, left = (q.shape[0] - r) // 2, (q.shape[1] - r) // 2
            out.append(q[top : top + r, left : left + r].transpose(2, 0, 1))
    return out


def assert_is_a_reference_crop(got: np.ndarray, pixels: np.ndarray, r: int) -> None:
    crops = reference_crops(pixels, r)
    assert any(np.array_equal(got, c) for c in crops), \
        f"no pass order gives the crop; closest differs by {min(np.abs(got.astype(int) - c).max() for c in crops)}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("size", "r"), [((37, 53), 16), ((16, 16), 16), ((400, 130), 16), ((130, 401), 16),
                                          ((33, 16), 16), ((15, 20), 16), ((131, 97), 32), ((512, 384), 64)])
def test_crop_rule_equals_an_independent_implementation(size, r):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # noise: any misplaced pixel shows
    got = preprocess(_png(Image.fromarray(noise)), "noise.png", r)
    assert got.shape == (3, r, r) and got.dtype == np.uint8
    assert_is_a_reference_crop(got, noise, r)  # bit-exact


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "1"])
def test_every_mode_is_cropped_as_its_rgb_conversion(mode):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).convert(mode)
    data = _png(image) if mode != "CMYK" else _jpeg(image)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert_is_a_reference_crop(preprocess(data, "x", 16), rgb, 16)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- the source: 12 images of different sizes, modes and formats in two class folders --------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from diffusers import AutoencoderKL

    t = tmp_path_factory.mktemp("encode")
    rng = np.random.default_rng(3)
    for k in range(12):
        folder = t / "images" / ("cat" if k % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(12, 70, 2))
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
        image = Image.fromarray(np.clip(smooth + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))
        if k == 3:
            image = image.convert("L")
        if k == 5:
            image = image.convert("RGBA")
        image.save(folder / (f"{k:02d}.jpg" if k % 3 == 0 else f"{k:02d}.png"))
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)
    vae.save_pretrained(t / "vae", safe_serialization=True)
    return t


def reference_posterior(ws) -> tuple[np.ndarray, np.ndarray]:
    """Each image (sorted names) preprocessed, then the VAE's own `encode` one image at a time: (12, 8, 8, 8)
    raw mean and std, and the labels (sorted folder order: cat = 0, dog = 1)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ws / "vae").eval()
    names = sorted(p.relative_to(ws / "images").as_posix() for p in (ws / "images").rglob("*.*"))
    rows = []
    with torch.no_grad():
        for name in names:
            pixels = preprocess((ws / "images" / name).read_bytes(), name, R)
            d = vae.encode(torch.tensor(pixels[None], dtype=torch.float32) / 255).latent_dist
            rows.append(torch.cat([d.mean, d.std], dim=1)[0].numpy())
    labels = np.array([0 if n.startswith("cat/") else 1 for n in names])
    return np.stack(rows), labels


@pytest.fixture(scope="module")
def encoded(ws, tmp_path_factory, one_thread):
    """The source encoded in the three layouts (batch 5: calls of 5, 5, 2 images)."""
    out = tmp_path_factory.mktemp("encoded")
    for fmt, name in (("shards", "shards"), ("edm2", "edm2"), ("edm2", "edm2.zip")):
        encode(EncodeSpec(data=str(ws / "images"), vae=str(ws / "vae"), resolution=R, out=str(out / name),
                          format=fmt, batch=5, device="cpu"), progress=False)
    return out


def test_posterior_equals_the_vaes_own_encode_and_labels_follow_the_folders(ws, encoded):
    ref, labels = reference_posterior(ws)
    names = sorted(p.relative_to(encoded / "edm2").as_posix() for p in (encoded / "edm2").rglob("*.npy"))
    assert names == [f"00000/img-mean-std-{k:08d}.npy" for k in range(12)]
    raw = np.stack([np.load(encoded / "edm2" / n) for n in names])
    assert raw.dtype == np.float32 and raw.shape == (12, 8, 8, 8)
    np.testing.assert_allclose(raw, ref, rtol=0, atol=1e-5)
    dataset = json.loads((encoded / "edm2" / "dataset.json").read_text())
    assert dataset == {"labels": [[n, int(c)] for n, c in zip(names, labels)]}
    # the set's statistics: mean and std of the posterior means per channel, over images and pixels
    stats = json.loads((encoded / "edm2" / "latent_stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], ref[:, :4].mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], ref[:, :4].std(axis=(0, 2, 3)), rtol=1e-5)
    # ... used to whiten: mean -> (mean - m) * 0.5 / s, std -> std * 0.5 / s
    m, s = np.array(stats["mean"])[:, None, None], np.array(stats["std"])[:, None, None]
    ds = load(encoded / "shards", latents="posterior")
    np.testing.assert_allclose(ds.samples[:, :4], (ref[:, :4] - m) * 0.5 / s, atol=1e-5)
    np.testing.assert_allclose(ds.samples[:, 4:], ref[:, 4:] * 0.5 / s, atol=1e-5)
    np.testing.assert_array_equal(ds.labels, labels)
    whitened = ds.samples[:, :4].reshape(12, 4, -1).transpose(1, 0, 2).reshape(4, -1)
    np.testing.assert_allclose(whitened.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(whitened.std(axis=1), 0.5, rtol=1e-5)


@pytest.mark.parametrize("latents", ["mean", "posterior"])
def test_shards_and_edm2_layouts_read_back_the_same(encoded, latents):
    sets = [load(encoded / name, latents=latents) for name in ("shards", "edm2", "edm2.zip")]
    for ds in sets[1:]:
        np.testing.assert_array_equal(ds.samples, sets[0].samples)
        np.testing.assert_array_equal(ds.labels, sets[0].labels)
        assert ds.fingerprint == sets[0].fingerprint and ds.normalisation == sets[0].normalisation
    assert sets[0].sample_shape == ((4 if latents == "mean" else 8), 8, 8)
    with zipfile.ZipFile(encoded / "edm2.zip") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_estimate_train_and_decode_on_the_latents(ws, encoded, tmp_path, capsys):
    from diffusers import AutoencoderKL

    table = tmp_path / "j.parquet"
    code, _, err = cli(["estimate", "--data", str(encoded / "shards"), "--latents", "posterior", "--sigmas", "0.1,1,10",
                        "--estimator", "exact", "--out", str(table)], capsys)
    assert code == 0 and table.is_file(), err
    code, _, err = cli(["train", "--data", str(encoded / "shards"), "--latents", "posterior", "--j-star", str(table),
                        "--preset", "auto", "--unconditional", "--images", "64", "--batch", "32", "--eval-samples",
                        "8", "--eval-sigmas", "0.1,1", "--samples", "0", "--device", "cpu", "--out",
                        str(tmp_path / "run")], capsys)
    assert code == 0, err
    code, _, err = cli(["data", "decode", "--data", str(encoded / "edm2.zip"), "--vae", str(ws / "vae"), "--out",
                          str(tmp_path / "pngs"), "--count", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == ["00000000.png", "00000001.png", "00000002.png"]
    ref, _ = reference_posterior(ws)
    vae = AutoencoderKL.from_pretrained(ws / "vae").eval()
    with torch.no_grad():
        expected = (vae.decode(torch.tensor(ref[:3, :4])).sample.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    got = np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1) for p in pngs])
    assert got.shape == (3, 3, R, R)
    assert np.abs(got.astype(int) - expected).max() <= 1  # whiten/un-whiten in float32: at most one level
    # a sampler's output: whitened latents in a .npy (EDM2's constants, a sampler carries no statistics)
    np.save(tmp_path / "x.npy", load(encoded / "shards").samples[:2])
    code, _, err = cli(["data", "decode", "--data", str(tmp_path / "x.npy"), "--vae", str(ws / "vae"), "--out",
                        str(tmp_path / "npy-pngs"), "--device", "cpu"], capsys)
    assert code == 0 and len(list((tmp_path / "npy-pngs").iterdir())) == 2, err


def test_a_killed_encode_continues_from_its_work_folder(ws, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(lossfloor.data.encoding, "CHUNK", 4)  # 3 chunks
    spec = EncodeSpec(data=str(ws / "images"), vae=str(ws / "vae"), resolution=R, out=str(tmp_path / "a"), batch=2,
                      device="cpu")
    real, calls = lossfloor.data.encoding.ChunkEncoder.__call__, []

    def killed(self, i):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(lossfloor.data.encoding.ChunkEncoder, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        encode(spec, progress=False)
    assert not (tmp_path / "a").exists() and len(list(work_path(tmp_path / "a").glob("chunk-*.npy"))) == 1
    calls.clear()
    monkeypatch.setattr(lossfloor.data.encoding.ChunkEncoder, "__call__",
                        lambda self, i: calls.append(i) or real(self, i))
    encode(spec, progress=False)
    assert calls == [1, 2] and not work_path(tmp_path / "a").exists()  # chunk 0 reused, work folder gone
    encode(EncodeSpec(**{**spec.__dict__, "out": str(tmp_path / "b")}), progress=False)  # uninterrupted
    resumed, whole = (load(tmp_path / name, latents="posterior") for name in ("a", "b"))
    assert resumed.fingerprint == whole.fingerprint


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_ray_engine_writes_the_local_bytes(ws, tmp_path, monkeypatch, one_thread, local_ray):
    monkeypatch.setattr(lossfloor.data.encoding, "CHUNK", 4)  # 3 chunks over 2 workers
    spec = EncodeSpec(data=str(ws / "images"), vae=str(ws / "vae"), resolution=R, out=str(tmp_path / "local"),
                      format="edm2", batch=3)
    encode(EncodeSpec(**{**spec.__dict__, "device": "cpu"}), progress=False)
    encode(EncodeSpec(**{**spec.__dict__, "out": str(tmp_path / "ray")}), progress=False,
           engine=Engine(kind="ray", workers=2, cpus_per_worker=1))
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert len(files) == 14
    for f in files:
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes(), f


def test_label_schemes(ws, tmp_path):
    assert list(list_images(str(ws / "images")).labels) == [0] * 6 + [1] * 6  # cat/, then dog/
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        Image.new("RGB", (20 + k, 9)).save(flat / f"{k}.png")
    assert list_images(str(flat)).labels is None
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": [["0.png", 4], ["1.png", 2], ["2.png", 4]]}))
    assert list(list_images(str(flat), str(labels)).labels) == [4, 2, 4]
    with pytest.raises(InputError, match=r"--labels .*class sub-folders"):
        list_images(str(ws / "images"), str(labels))
    with pytest.raises(InputError, match=r"none for 2\.png"):
        labels.write_text(json.dumps({"labels": [["0.png", 4], ["1.png", 2]]}))
        list_images(str(flat), str(labels))
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:
        for p in sorted((ws / "images").rglob("*.*")):
            z.write(p, p.relative_to(ws / "images").as_posix())
    zipped = list_images(str(tmp_path / "z.zip"))
    assert zipped.names == list_images(str(ws / "images")).names and list(zipped.labels) == [0] * 6 + [1] * 6
