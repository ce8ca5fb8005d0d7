"""Pixels to latents and back: the `lossfloor data encode` and `lossfloor data decode` jobs.

    encode(EncodeSpec(data="imagenet/train", vae="sd-vae-ft-mse", resolution=512, out="latents"),
           engine=Engine(kind="ray", workers=8, gpus_per_worker=1))
    decode(DecodeSpec(data="latents", vae="sd-vae-ft-mse", out="pngs", count=64))

encode: every input checked first (source and labels, VAE folder, resolution, --out), then the source's
images are encoded chunk by chunk (`lossfloor.data.encoding`) on this process or on Ray Data
(`lossfloor.ray.encode`) into a work folder beside --out (`.OUT.encode-work/`, kept when a run is
killed or fails after some chunks: the same command continues from it), then the set's per-channel
statistics are computed and the set is written (`lossfloor.data.latent_sets`) into a temporary sibling
that is renamed to --out when complete. A progress line shows images/s.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lossfloor.atomic import check_writable, make_parents, write_atomic
from lossfloor.errors import InputError
from lossfloor.jobs.engine import LOCAL, Engine

log = logging.getLogger(__name__)

FORMATS = ("shards", "edm2")


@dataclass(frozen=True, kw_only=True)
class EncodeSpec:
    """`lossfloor data encode`'s inputs (README, "Pixels to latents")."""

    data: str  # folder or .zip of PNG/JPEG images
    vae: str  # a local AutoencoderKL folder
    resolution: int  # R: images are centre-cropped to R x R
    out: str
    format: str = "shards"  # shards | edm2 (a folder, or a .zip when OUT ends in .zip)
    labels: str | None = None  # a dataset.json-style labels file
    batch: int = 8  # images per encoder call
    device: str | None = None  # the local engine's: cpu | cuda[:N] (None: cuda when available)


@dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """`lossfloor data decode`'s inputs."""

    data: str  # a latent set (shards or EDM2 latents) or a .npy of whitened latents (n, 4, h, w)
    vae: str
    out: str  # a folder of PNGs
    count: int | None = None  # the first N latents (default all)
    batch: int = 8
    device: str | None = None  # cpu | cuda[:N] (None: cuda when available)


def work_path(out: str | os.PathLike) -> Path:
    """The work folder of an encode into OUT."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.encode-work"


def check_encode(spec: EncodeSpec, engine: Engine):
    """Every input of an encode, before any work: returns its plan (`lossfloor.data.encoding`)."""
    from lossfloor.data.encoding import EncodePlan
    from lossfloor.data.image_list import list_images
    from lossfloor.data.vae import check_vae_folder, downsampling

    if spec.format not in FORMATS:
        raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {spec.format!r}")
    r = spec.resolution
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 8 and r % 8 == 0):
        raise InputError(f"--resolution: expected a multiple of 8, at least 8 (e.g. 512), got {r!r}")
    if not (isinstance(spec.batch, int) and not isinstance(spec.batch, bool) and spec.batch >= 1):
        raise InputError(f"--batch: expected an integer >= 1, got {spec.batch!r}")
    out = Path(spec.out).expanduser()
    if out.exists() or out.is_symlink():
        raise InputError(f"--out {spec.out}: exists; choose a new path (an encode never overwrites a set)")
    if spec.format == "shards" and out.suffix.lower() == ".zip":
        raise InputError(f"--out {spec.out}: shards are a folder; a .zip is for --format edm2")
    check_writable(out, folder=out.suffix.lower() != ".zip")
    config = check_vae_folder(spec.vae)
    if r % downsampling(config):
        raise InputError(f"--resolution {r}: expected a multiple of the VAE's downsampling factor "
                         f"{downsampling(config)}")
    if engine.kind == "ray" and spec.device is not None:
        raise InputError("--device: with --engine ray the device follows --gpus-per-worker (cuda when > 0)")
    from lossfloor.devices import check_device

    check_device(spec.device)
    images = list_images(spec.data, spec.labels)
    return EncodePlan.make(images, spec.vae, resolution=r, batch=spec.batch)


def encode(spec: EncodeSpec, *, engine: Engine = LOCAL, progress: bool = True) -> Path:
    """Encode spec.data into spec.out (module docstring); returns the output's path."""
    from lossfloor.data.encoding import ChunkEncoder, WorkFolder
    from lossfloor.floor.estimate import Progress

    plan = check_encode(spec, engine)
    device = _device(spec.device)
    out = Path(spec.out).expanduser()
    work = WorkFolder(work_path(out), plan)
    made = not work.path.exists()
    missing = work.missing()
    n_images = len(plan.images)
    done = n_images - sum(len(plan.chunk_range(i)) for i in missing)
    if done:
        log.info("work folder %s: %d of %d images already encoded", work.path, done, n_images)
    log.info("encoding %d images of %s at %dx%d with %s on %s", n_images, spec.data, plan.resolution,
             plan.resolution, spec.vae, engine.kind if engine.kind == "ray" else device)
    bar = Progress("encode", n_images, unit="images", enabled=progress, already=done)
    try:
        if engine.kind == "local":
            encoder = ChunkEncoder(plan, work, device=device)
            finished = (encoder(i) for i in missing)
        else:
            from lossfloor.ray.encode import encode_ray  # Ray only here

            finished = encode_ray(plan, work, missing, engine) if missing else iter(())
        for n in finished:
            bar.update(n)
        _publish(spec, plan, work, out)
    except BaseException:
        if made and work.path.is_dir() and len(work.missing()) == plan.n_chunks:
            shutil.rmtree(work.path, ignore_errors=True)  # nothing finished: nothing to resume
        raise
    shutil.rmtree(work.path, ignore_errors=True)
    return out


def _publish(spec: EncodeSpec, plan, work, out: Path) -> None:
    """Statistics, then the set written beside OUT and renamed to it."""
    from lossfloor.data.latent_sets import channel_stats, write_edm2, write_shards

    def raw():
        return (work.read(i) for i in range(plan.n_chunks))

    t0 = time.monotonic()
    stats = channel_stats(raw())
    log.info("latent statistics per channel: mean %s, std %s", _short(stats.mean), _short(stats.std))
    labels = plan.images.labels
    make_parents(out)
    if spec.format == "edm2" and out.suffix.lower() == ".zip":
        write_atomic(out, lambda tmp: write_edm2(tmp, raw, labels, stats=stats, as_zip=True))
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            if spec.format == "edm2":
                write_edm2(tmp, raw, labels, stats=stats, as_zip=False)
            else:
                write_shards(tmp, raw, labels, count=len(plan.images), shape=plan.latent_shape, stats=stats,
                             source=spec.data)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote %s (%s, %d images) in %.1f s", out, spec.format, len(plan.images), time.monotonic() - t0)


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def check_decode(spec: DecodeSpec) -> None:
    from lossfloor.data.vae import check_vae_folder

    if spec.count is not None and not (isinstance(spec.count, int) and spec.count >= 1):
        raise InputError(f"--count: expected an integer >= 1, got {spec.count!r}")
    if not (isinstance(spec.batch, int) and not isinstance(spec.batch, bool) and spec.batch >= 1):
        raise InputError(f"--batch: expected an integer >= 1, got {spec.batch!r}")
    out = Path(spec.out).expanduser()
    if out.exists():
        raise InputError(f"--out {spec.out}: exists; choose a new folder for the PNGs")
    check_writable(out, folder=True)
    check_vae_folder(spec.vae)
    from lossfloor.devices import check_device

    check_device(spec.device)


def read_latents(src: str, count: int | None):
    """(whitened latents (n, 4, h, w), their stats) of a latent set, or of a .npy of whitened latents
    (EDM2's constants: a sampler's output carries no stats)."""
    from lossfloor.data import load
    from lossfloor.data.edm2 import EDM2_STATS

    if src.lower().endswith(".npy"):
        try:
            x = np.load(src, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"--data {src}: cannot read it as a .npy ({e})") from None
        if x.ndim != 4 or x.shape[1] != 4:
            raise InputError(f"--data {src}: expected whitened latents (n, 4, h, w), got shape {list(x.shape)}")
        return np.asarray(x[:count], dtype=np.float32), EDM2_STATS
    stats = latent_stats(src, "--data", alternative=" or a .npy of whitened latents")
    return load(src, max_samples=None if count is None else max(count, 2)).samples[:count], stats


def latent_stats(src: str, flag: str, alternative: str = ""):
    """The per-channel statistics (`lossfloor.data.edm2.LatentStats`) the latent set SRC was whitened with:
    a `lossfloor data encode` set's own, an EDM2 latent folder or zip's latent_stats.json, else EDM2's
    constants; InputError naming `flag` for anything else."""
    from lossfloor.data import open_source
    from lossfloor.data.edm2 import LATENT_NORMALISATION, LatentStats
    from lossfloor.data.shards import ShardReader

    try:
        reader = open_source(src)
        normalisation = reader.info().normalisation
    except InputError as e:
        raise InputError(f"{flag} {e}") from None
    if normalisation != LATENT_NORMALISATION:
        raise InputError(f"{flag} {src}: expected a latent set (lossfloor data encode, EDM2 latents){alternative}")
    if not isinstance(reader, ShardReader):
        return reader.stats  # EDM2 latents: their latent_stats.json, else EDM2's constants
    if reader.meta.latent_stats is None:
        raise InputError(f"{flag} {reader.path}: shards of whitened latents without their statistics; give the set "
                         "they were prepared from")
    return LatentStats.from_dict(reader.meta.latent_stats, reader.path)


def decode(spec: DecodeSpec, *, progress: bool = True) -> Path:
    """Decode spec.data's latents to PNGs `NNNNNNNN.png` in spec.out (made when all are written)."""
    from PIL import Image

    from lossfloor.data.vae import decode_latents, load_vae
    from lossfloor.floor.estimate import Progress

    check_decode(spec)
    latents, stats = read_latents(spec.data, spec.count)
    vae = load_vae(spec.vae, device=_device(spec.device))
    out = Path(spec.out).expanduser()
    make_parents(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bar = Progress("decode", len(latents), unit="images", enabled=progress)
    try:
        for start in range(0, len(latents), spec.batch):
            images = decode_latents(vae, latents[start : start + spec.batch], stats, batch=spec.batch)
            for k, image in enumerate(images):
                Image.fromarray(image.transpose(1, 2, 0)).save(tmp / f"{start + k:08d}.png")
            bar.update(len(images))
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["FORMATS", "DecodeSpec", "EncodeSpec", "check_encode", "decode", "encode", "latent_stats", "work_path"]
