"""lossfloor.data readers: every source kind on tiny generated fixtures, checked against what was written."""

import hashlib
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from lossfloor.data import Fingerprinter, describe, fingerprint, iter_chunks, load
from lossfloor.errors import InputError

LATENT_MEAN = np.array([5.81, 3.25, 0.12, -2.15])
LATENT_STD = np.array([4.17, 4.62, 3.71, 3.28])


# ---------------------------------------------------------------- fixtures


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_pixels(rng, n, shape=(5, 4, 3)):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def expected_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8 -> (n, C, H, W) in [-1, 1], written out element by element."""
    n, h, w, c = pixels.shape
    out = np.empty((n, c, h, w), dtype=np.float64)
    for k in range(n):
        for ch in range(c):
            out[k, ch] = pixels[k, :, :, ch] / 127.5 - 1.0
    return out


def write_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_cifar(root, sizes, rng):
    root.mkdir()
    data, labels = [], []
    for i, n in enumerate(sizes, start=1):
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=n)], b"batch_label": b"x"}
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
        data.append(batch[b"data"])
        labels += batch[b"labels"]
    return np.concatenate(data), np.array(labels)


def assert_input_error_names(path, fn, *args, **kwargs):
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_sha256_of_header_and_c_order_bytes():
    a = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    header = b'lossfloor.fingerprint/1\n{"dtype":"<f4","shape":[4,2,3]}\n'
    assert fingerprint(a) == hashlib.sha256(header + a.tobytes(order="C")).hexdigest()
    assert fingerprint(np.asfortranarray(a)) == fingerprint(a)  # bytes hashed in C order


def test_fingerprint_streaming_equals_one_shot_and_detects_changes():
    a = np.random.default_rng(0).standard_normal((11, 3, 2)).astype(np.float32)
    hasher = Fingerprinter(shape=a.shape)
    for start, stop in [(0, 3), (3, 3), (3, 8), (8, 11)]:
        hasher.update(a[start:stop])
    assert hasher.hexdigest() == fingerprint(a) == fingerprint(a.copy())
    changed = a.copy()
    changed[7, 1, 0] = np.nextafter(changed[7, 1, 0], np.float32(np.inf))
    assert fingerprint(changed) != fingerprint(a)
    assert fingerprint(a.reshape(11, 6)) != fingerprint(a)  # same bytes, other shape
    assert fingerprint(a.astype(np.float64)) != fingerprint(a)
    with pytest.raises(ValueError):
        Fingerprinter(shape=a.shape).hexdigest()  # rows missing


# ---------------------------------------------------------------- npy / npz


def test_npy_is_used_as_given_cast_to_float32(tmp_path):
    a = np.random.default_rng(1).standard_normal((7, 2, 3)) * 100
    np.save(tmp_path / "a.npy", a)
    ds = load(tmp_path / "a.npy")
    assert ds.samples.dtype == np.float32 and ds.samples.flags.c_contiguous
    np.testing.assert_array_equal(ds.samples, a.astype(np.float32))
    assert ds.labels is None and ds.normalisation == "none" and ds.source == str(tmp_path / "a.npy")
    assert ds.fingerprint == fingerprint(a.astype(np.float32))
    assert describe(tmp_path / "a.npy") == (7, (2, 3))


def test_npy_integer_fortran_and_1d_arrays(tmp_path):
    ints = np.arange(12, dtype=np.int16).reshape(4, 3) - 5
    np.save(tmp_path / "i.npy", np.asfortranarray(ints))
    np.testing.assert_array_equal(load(tmp_path / "i.npy").samples, ints.astype(np.float32))
    np.save(tmp_path / "v.npy", np.array([0.5, -2.0, 3.0]))
    ds = load(str(tmp_path / "v.npy"))
    assert ds.samples.shape == (3,)
    np.testing.assert_array_equal(ds.samples, [0.5, -2.0, 3.0])


def test_npz_x_and_labels_plain_and_compressed(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((9, 4)), rng.integers(0, 5, size=9).astype(np.int32)
    np.savez(tmp_path / "a.npz", x=x, labels=y, other=np.zeros(3))
    np.savez_compressed(tmp_path / "b.npz", x=x, y=y)
    for name in ("a.npz", "b.npz"):
        ds = load(tmp_path / name)
        np.testing.assert_array_equal(ds.samples, x.astype(np.float32))
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, y)


def test_npz_fortran_order_member(tmp_path):
    x = np.asfortranarray(np.arange(30.0).reshape(6, 5))
    np.savez(tmp_path / "f.npz", x=x)
    np.testing.assert_array_equal(load(tmp_path / "f.npz").samples, x)


def test_npz_key_selection_and_single_array(tmp_path):
    x, z = np.arange(10.0).reshape(5, 2), np.arange(6.0).reshape(3, 2) * -1
    np.savez(tmp_path / "k.npz", data=x, z=z)
    np.testing.assert_array_equal(load(f"{tmp_path}/k.npz:z").samples, z)
    np.testing.assert_array_equal(load(f"{tmp_path}/k.npz:data").samples, x)
    assert_input_error_names(tmp_path / "k.npz", load, tmp_path / "k.npz")  # two candidates, no x
    assert_input_error_names(tmp_path / "k.npz", load, f"{tmp_path}/k.npz:nope")
    np.savez(tmp_path / "one.npz", data=x, y=np.arange(5))  # the only array besides the labels
    ds = load(tmp_path / "one.npz")
    np.testing.assert_array_equal(ds.samples, x)
    np.testing.assert_array_equal(ds.labels, np.arange(5))


def test_npz_bad_labels(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 2)), labels=np.array([0.5, 1, 2, 3]))
    assert_input_error_names(tmp_path / "f.npz", load, tmp_path / "f.npz")
    np.savez(tmp_path / "n.npz", x=np.zeros((4, 2)), labels=np.arange(3))
    assert_input_error_names(tmp_path / "n.npz", load, tmp_path / "n.npz")


# ---------------------------------------------------------------- image folders


def test_image_folder_flat_rgb_known_pixels(tmp_path):
    rng = np.random.default_rng(3)
    pixels = random_pixels(rng, 3)  # (3, H=5, W=4, C=3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(pixels):
        (folder / f"im{i}.png").write_bytes(png_bytes(p))
    (folder / "notes.txt").write_text("ignored")
    ds = load(folder)
    assert ds.samples.shape == (3, 3, 5, 4) and ds.labels is None
    assert ds.normalisation == "uint8/127.5-1"
    np.testing.assert_allclose(ds.samples, expected_from_pixels(pixels), rtol=0, atol=1e-6)
    assert ds.samples[pixels.transpose(0, 3, 1, 2) == 0].tolist() == [-1.0] * int((pixels == 0).sum())
    assert ds.samples[pixels.transpose(0, 3, 1, 2) == 255].tolist() == [1.0] * int((pixels == 255).sum())


def test_image_folder_class_subfolders_give_sorted_labels(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "classes"
    layout = {"dog": 2, "cat": 1, "emu": 2}  # sorted: cat=0, dog=1, emu=2
    written = {}
    for cls, n in layout.items():
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            grey = rng.integers(0, 256, size=(3, 2), dtype=np.uint8)
            (folder / cls / f"{i}.png").write_bytes(png_bytes(grey))
            written[f"{cls}/{i}.png"] = grey
    ds = load(folder)
    names = sorted(written)  # source order: sorted relative paths
    assert ds.samples.shape == (5, 1, 3, 2)
    np.testing.assert_array_equal(ds.labels, [{"cat": 0, "dog": 1, "emu": 2}[n.split("/")[0]] for n in names])
    for k, name in enumerate(names):
        np.testing.assert_allclose(ds.samples[k, 0], written[name] / 127.5 - 1, atol=1e-6)


def test_image_folder_jpeg(tmp_path):
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i, value in enumerate([40, 200]):
        Image.new("RGB", (8, 8), (value, value, value)).save(folder / f"{i}.JPG", quality=100)
    ds = load(folder)
    assert ds.samples.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(ds.samples[0], 40 / 127.5 - 1, atol=2 / 127.5)
    np.testing.assert_allclose(ds.samples[1], 200 / 127.5 - 1, atol=2 / 127.5)


def test_image_folder_bad_inputs(tmp_path):
    rng = np.random.default_rng(5)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    (sizes / "a.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    (sizes / "b.png").write_bytes(png_bytes(random_pixels(rng, 1, (6, 4, 3))[0]))
    message = assert_input_error_names(sizes / "b.png", load, sizes)
    assert "(3, 5, 4)" in message
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "a.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    (channels / "b.png").write_bytes(png_bytes(random_pixels(rng, 1, (5, 4))[0]))
    assert_input_error_names(channels / "b.png", load, channels)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    (corrupt / "b.png").write_bytes(b"this is not a png")
    assert_input_error_names(corrupt / "b.png", load, corrupt)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "a.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    (truncated / "b.png").write_bytes(png_bytes(random_pixels(rng, 1, (64, 64, 3))[0])[:200])
    assert_input_error_names(truncated / "b.png", load, truncated)
    mixed = tmp_path / "mixed"
    (mixed / "cls").mkdir(parents=True)
    (mixed / "top.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    (mixed / "cls" / "x.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    assert_input_error_names(mixed, load, mixed)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_input_error_names(empty, load, empty)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(png_bytes(random_pixels(rng, 1)[0]))
    assert_input_error_names(one, load, one)


# ---------------------------------------------------------------- EDM2


def test_edm2_zip_images_with_labels(tmp_path):
    rng = np.random.default_rng(6)
    pixels = random_pixels(rng, 3, (4, 4, 3))
    names = [f"00000/img{i:08d}.png" for i in range(3)]
    labels = [7, 0, 3]
    members = {n: png_bytes(p) for n, p in zip(names, pixels)}
    members["dataset.json"] = json.dumps({"labels": [[n, lab] for n, lab in zip(names, labels)]}).encode()
    ds = load(write_zip(tmp_path / "d.zip", members))
    np.testing.assert_allclose(ds.samples, expected_from_pixels(pixels), atol=1e-6)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.normalisation == "uint8/127.5-1"


def test_edm2_folder_with_null_labels(tmp_path):
    rng = np.random.default_rng(7)
    pixels = random_pixels(rng, 2, (4, 4, 3))
    for i, p in enumerate(pixels):
        (tmp_path / "e" / "00000").mkdir(parents=True, exist_ok=True)
        (tmp_path / "e" / "00000" / f"img{i:08d}.png").write_bytes(png_bytes(p))
    (tmp_path / "e" / "dataset.json").write_text('{"labels": null}')
    ds = load(tmp_path / "e")
    assert ds.labels is None  # not class folders: "00000" is an EDM2 bucket
    np.testing.assert_allclose(ds.samples, expected_from_pixels(pixels), atol=1e-6)


def test_edm2_latents_are_whitened_posterior_means(tmp_path):
    rng = np.random.default_rng(8)
    mean_std = [
        np.concatenate([rng.normal(3, 4, (4, 2, 3)), rng.uniform(0.1, 1, (4, 2, 3))]).astype(np.float32)
        for _ in range(3)
    ]
    names = [f"{i // 2:05d}/img-mean-std-{i:08d}.npy" for i in range(3)]  # two buckets
    members = {n: npy_bytes(a) for n, a in zip(names, mean_std)}
    members["dataset.json"] = json.dumps({"labels": [[n, i] for i, n in enumerate(names)]}).encode()
    ds = load(write_zip(tmp_path / "lat.zip", members))
    assert ds.samples.shape == (3, 4, 2, 3) and ds.normalisation == "edm2-latent-whiten"
    for k, a in enumerate(mean_std):
        for c in range(4):
            expected = (a[c].astype(np.float64) - LATENT_MEAN[c]) * (0.5 / LATENT_STD[c])
            np.testing.assert_allclose(ds.samples[k, c], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ds.labels, [0, 1, 2])
    folder = tmp_path / "latdir"
    for name, data in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    assert load(folder).fingerprint == ds.fingerprint  # the same data as a folder


def test_edm2_bad_inputs(tmp_path):
    rng = np.random.default_rng(9)
    good = npy_bytes(rng.standard_normal((8, 2, 2)).astype(np.float32))
    four_channels = npy_bytes(np.zeros((4, 2, 2), dtype=np.float32))
    bad_channels = write_zip(tmp_path / "c.zip", {"00000/img-mean-std-00000000.npy": good,
                                                  "00000/img-mean-std-00000001.npy": four_channels})
    assert_input_error_names(tmp_path / "c.zip", load, bad_channels)
    png = png_bytes(random_pixels(rng, 1, (4, 4, 3))[0])
    unlabeled = write_zip(tmp_path / "u.zip", {"00000/img00000000.png": png, "00000/img00000001.png": png,
                                               "dataset.json": b'{"labels": [["00000/img00000000.png", 1]]}'})
    assert_input_error_names("00000/img00000001.png", load, unlabeled)
    broken_json = write_zip(tmp_path / "j.zip", {"00000/img00000000.png": png, "00000/img00000001.png": png,
                                                 "dataset.json": b'{"labels": [[1'})
    assert_input_error_names(tmp_path / "j.zip", load, broken_json)
    not_zip = tmp_path / "n.zip"
    not_zip.write_bytes(b"PK\x03\x04 garbage")
    assert_input_error_names(not_zip, load, not_zip)
    truncated = tmp_path / "t.zip"
    truncated.write_bytes((tmp_path / "c.zip").read_bytes()[:-40])
    assert_input_error_names(truncated, load, truncated)


# ---------------------------------------------------------------- CIFAR-10, bundled


def test_cifar_batches(tmp_path):
    data, labels = write_cifar(tmp_path / "cifar", [3, 1, 2, 2, 1], np.random.default_rng(10))
    ds = load(tmp_path / "cifar")
    assert ds.samples.shape == (9, 3, 32, 32) and ds.normalisation == "uint8/127.5-1"
    np.testing.assert_array_equal(ds.labels, labels)
    for k, c, h, w in [(0, 0, 0, 0), (3, 1, 5, 31), (8, 2, 31, 7)]:  # red plane, then green, then blue
        assert ds.samples[k, c, h, w] == np.float32(data[k, c * 1024 + h * 32 + w]) / np.float32(127.5) - 1
    sizes = [len(s) for s, _ in iter_chunks(tmp_path / "cifar", 4)]  # across batch boundaries
    assert sizes == [4, 4, 1]


def test_cifar_bad_inputs(tmp_path):
    write_cifar(tmp_path / "cifar", [2, 2, 2, 2, 2], np.random.default_rng(11))
    os.remove(tmp_path / "cifar" / "data_batch_4")
    assert_input_error_names(tmp_path / "cifar" / "data_batch_4", load, tmp_path / "cifar")
    evil = tmp_path / "evil"
    write_cifar(evil, [2, 2, 2, 2, 2], np.random.default_rng(12))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (evil / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    assert_input_error_names(evil / "data_batch_2", load, evil)
    assert not marker.exists()


def test_bundled_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    ds = load("bundled:digits")
    assert ds.samples.shape == (1797, 1, 8, 8) and ds.normalisation == "digits/8-1"
    np.testing.assert_array_equal(ds.samples.reshape(1797, 64), (digits.data / 8 - 1).astype(np.float32))
    np.testing.assert_array_equal(ds.labels, digits.target)
    assert ds.samples.min() == -1 and ds.samples.max() == 1
    assert load("bundled:digits", max_samples=10).fingerprint == fingerprint(ds.samples[:10])
    assert_input_error_names("bundled:mnist", load, "bundled:mnist")


def test_bundled_photos_are_windows_of_the_sample_photographs():
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    ds = load("bundled:photos")
    per_image = (((427 - 32) // 16) + 1) * (((640 - 32) // 16) + 1)
    assert ds.samples.shape == (2 * per_image, 3, 32, 32) and ds.labels is None
    assert ds.samples.min() == -1 and ds.samples.max() == 1
    cols = ((640 - 32) // 16) + 1
    for n in (0, 7, per_image - 1, per_image + 45):  # the window of the n-th patch, cut by hand
        img, k = photos[n // per_image], n % per_image
        r, c = 16 * (k // cols), 16 * (k % cols)
        window = img[r:r + 32, c:c + 32].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(ds.samples[n], window)


def test_bundled_terrain_is_the_elevation_model_cut_in_windows():
    from matplotlib.cbook import get_sample_data

    with np.load(get_sample_data("jacksboro_fault_dem.npz", asfileobj=False)) as f:
        z = f["elevation"].astype(np.float64)
    ds = load("bundled:terrain")
    rows, cols = (344 - 16) // 8 + 1, (403 - 16) // 8 + 1
    assert ds.samples.shape == (rows * cols, 1, 16, 16) and ds.labels is None
    lo, hi = z.min(), z.max()  # 236 m and 1076 m
    k = 5 * cols + 11  # patch at corner (40, 88)
    np.testing.assert_allclose(ds.samples[k, 0], 2 * (z[40:56, 88:104] - lo) / (hi - lo) - 1, atol=1e-6)
    assert ds.samples.min() == -1 and ds.samples.max() == 1


# ---------------------------------------------------------------- bad input, streaming


def test_bad_sources_name_the_path(tmp_path):
    assert_input_error_names(tmp_path / "missing.npy", load, tmp_path / "missing.npy")
    (tmp_path / "a.txt").write_text("1 2 3")
    assert_input_error_names(tmp_path / "a.txt", load, tmp_path / "a.txt")
    np.save(tmp_path / "full.npy", np.zeros((100, 4)))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-64])
    assert_input_error_names(tmp_path / "trunc.npy", load, tmp_path / "trunc.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    assert_input_error_names(tmp_path / "empty.npy", load, tmp_path / "empty.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None]), allow_pickle=True)
    assert_input_error_names(tmp_path / "obj.npy", load, tmp_path / "obj.npy")
    np.save(tmp_path / "one.npy", np.zeros((1, 3)))
    assert_input_error_names(tmp_path / "one.npy", load, tmp_path / "one.npy")
    np.save(tmp_path / "complex.npy", np.zeros((3, 2), dtype=np.complex64))
    assert_input_error_names(tmp_path / "complex.npy", load, tmp_path / "complex.npy")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert_input_error_names(tmp_path / "bad.npz", load, tmp_path / "bad.npz")
    with pytest.raises(InputError, match="max_samples"):
        load(tmp_path / "full.npy", max_samples=1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])  # 1e39 overflows float32
def test_non_finite_values_are_rejected_with_the_sample_index(tmp_path, bad):
    a = np.zeros((10, 3))
    a[6, 2] = bad
    np.save(tmp_path / "nan.npy", a)
    message = assert_input_error_names(tmp_path / "nan.npy", load, tmp_path / "nan.npy")
    assert "sample 6" in message
    with pytest.raises(InputError, match="sample 6"):
        list(iter_chunks(tmp_path / "nan.npy", 4))


def test_iter_chunks_matches_load_and_fingerprint(tmp_path):
    x, y = np.random.default_rng(13).standard_normal((23, 2, 2)), np.arange(23) % 4
    np.savez_compressed(tmp_path / "a.npz", x=x, labels=y)
    np.save(tmp_path / "a.npy", x)
    for src in (tmp_path / "a.npz", tmp_path / "a.npy"):
        ds = load(src)
        parts = list(iter_chunks(src, 5))
        assert [len(s) for s, _ in parts] == [5, 5, 5, 5, 3]
        hasher = Fingerprinter(shape=ds.samples.shape)
        for samples, _ in parts:
            assert samples.dtype == np.float32 and samples.flags.c_contiguous
            hasher.update(samples)
        assert hasher.hexdigest() == ds.fingerprint
        np.testing.assert_array_equal(np.concatenate([s for s, _ in parts]), ds.samples)
        if ds.labels is not None:
            np.testing.assert_array_equal(np.concatenate([lab for _, lab in parts]), y)
    parts = list(iter_chunks(tmp_path / "a.npy", 4, max_samples=10))
    assert [len(s) for s, _ in parts] == [4, 4, 2]
    assert load(tmp_path / "a.npy", max_samples=10).fingerprint == fingerprint(x[:10].astype(np.float32))


def test_describe_reads_no_pixels(tmp_path):
    rng = np.random.default_rng(14)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(random_pixels(rng, 1, (6, 5, 3))[0]))
    (folder / "b.png").write_bytes(png_bytes(random_pixels(rng, 1, (6, 5, 3))[0])[:100])  # broken
    assert describe(folder) == (2, (3, 6, 5))
    assert_input_error_names(folder / "b.png", load, folder)


def test_edm2_latents_as_the_posterior(tmp_path):
    # latents="posterior": [whitened mean, std * 0.5/LATENT_STD] per sample, a different fingerprint
    rng = np.random.default_rng(10)
    mean_std = [np.concatenate([rng.normal(3, 4, (4, 2, 3)), rng.uniform(0.1, 1, (4, 2, 3))]).astype(np.float32)
                for _ in range(3)]
    members = {f"00000/img-mean-std-{i:08d}.npy": npy_bytes(a) for i, a in enumerate(mean_std)}
    path = write_zip(tmp_path / "lat.zip", members)
    means, post = load(path), load(path, latents="posterior")
    assert post.samples.shape == (3, 8, 2, 3) and post.normalisation == "edm2-latent-posterior-whiten"
    np.testing.assert_array_equal(post.samples[:, :4], means.samples)
    for k, a in enumerate(mean_std):
        for c in range(4):
            np.testing.assert_allclose(post.samples[k, 4 + c], a[4 + c] * (0.5 / LATENT_STD[c]), rtol=1e-6)
    assert post.fingerprint != means.fingerprint
    with pytest.raises(InputError, match=r"--latents posterior: .* no encoder posterior"):
        load("bundled:digits", latents="posterior")
    with pytest.raises(InputError, match="--latents"):
        load(path, latents="sample")
