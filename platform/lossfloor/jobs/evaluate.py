"""`lossfloor evaluate`: the sample quality of a model (FD, FID, FD_DINOv2) against reference statistics.

    reference(ReferenceSpec(data="bundled:digits", features="pixels", out="digits.stats.npz"))
    result = evaluate(EvaluateSpec(model="runs/tiny", reference_stats="digits.stats.npz", features="pixels",
                                   out="eval/", n_samples=5000, seeds=3))
    result["fd"]   # {"mean", "std", "min", "max", "per_seed"}

Every input is checked before any sampling: the output folder, the counts, the extractors (their network
files), the statistics file against the extractors and the data (`ReferenceStats.check`), the model (and
its guide) with one forward pass at the sample shape.

A latent model (`--vae DIR`): its samples are whitened latents, as lossfloor trains on the output of
`lossfloor data encode` or on EDM2 latents; each batch is un-whitened with the latent set's per-channel
statistics (raw = x / (0.5 / s_c) + m_c, `--latent-stats SRC`: the set's own, else EDM2's constants for
SD-VAE) and decoded by the VAE to uint8 images (`lossfloor.data.vae.decode_latents`), which go to the
feature extractors as a pixel model's quantised samples do. The reference statistics are of images, so
the decoded shape must be theirs. A lossfloor run's or EDM2 snapshot's sample shape is its config's: one
of neither 1 nor 3 channels without --vae, or one of 1 or 3 channels with it, is refused; other kinds of
models are sampled at the reference's shape, or with --vae at the latent shape that decodes to it.

The samples of seed s are blocks (`lossfloor.train.quality.blocks`) computed here or on Ray actors
(`lossfloor.ray.evaluate`); each finished block's feature sums are saved under OUT/work/<key>/, so an
interrupted evaluation resumes where it stopped (the key hashes what changes the numbers). A finished
seed keeps only its total; when every seed is done OUT gets metrics.json, the samples' statistics per
seed (samples-seed<s>.stats.npz) and the work folder is removed.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lossfloor.errors import InputError
from lossfloor.jobs.engine import LOCAL, Engine
from lossfloor.jobs.tracking import Tracking

if TYPE_CHECKING:
    from lossfloor.train.metrics import FeatureSums
    from lossfloor.train.quality import SamplerSettings

log = logging.getLogger(__name__)

EXPERIMENT = "evaluate"
METRICS_FILE = "metrics.json"
SAMPLERS = ("heun",)
MAX_BLOCKS = 64  # blocks per seed at most (the work folder holds each block's sums)
PROGRESS_SECONDS = 10.0
# The published protocol (EDM2's FID and FD_DINOv2): 50 000 samples per seed, three seeds. Torch-free here
# (torch and the train package load when an evaluation runs) so that a study's --help stays fast.
N_SAMPLES = 50_000
SEEDS = 3


def _default_sampler() -> SamplerSettings:
    from lossfloor.train.quality import SamplerSettings

    return SamplerSettings()


@dataclass(frozen=True, kw_only=True)
class ReferenceSpec:
    """`lossfloor evaluate --reference`: the statistics of --data in --features, written to --out."""

    data: str
    features: str
    out: str
    batch: int = 256
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class EvaluateSpec:
    """`lossfloor evaluate --model | --samples` (the command's flags)."""

    model: str | None = None
    samples: str | None = None  # a folder of PNGs instead of a model
    reference_stats: str
    features: str
    out: str
    data: str | None = None  # optional: checked against the statistics' fingerprint
    n_samples: int = N_SAMPLES
    seeds: int = SEEDS
    sampler: str = "heun"
    settings: SamplerSettings = field(default_factory=_default_sampler)
    ema: str = "auto"
    prediction: str | None = None
    process: str | None = None
    guidance: float = 1.0
    guide_model: str | None = None
    guide_ema: str = "auto"
    vae: str | None = None  # a latent model's VAE folder (diffusers AutoencoderKL)
    latent_stats: str | None = None  # the latent set whose statistics un-whiten the samples (default EDM2's)
    batch: int = 256
    device: str = "cpu"
    precision: str = "none"
    engine: Engine = LOCAL
    tracking: Tracking | None = None


def reference(spec: ReferenceSpec):
    """Compute and write the reference statistics; returns the `ReferenceStats`."""
    from lossfloor.atomic import check_writable
    from lossfloor.data import load
    from lossfloor.devices import check_device
    from lossfloor.train.metrics import feature_extractors
    from lossfloor.train.quality import reference_statistics, write_reference

    check_writable(spec.out, "--out")
    _check_batch(spec.batch)
    check_device(spec.device)
    extractors = feature_extractors(spec.features, device=spec.device)
    try:
        data = load(spec.data)
    except InputError as e:
        raise InputError(f"--data {e}") from None
    if len(data.samples) < 2:
        raise InputError(f"--data {spec.data}: expected at least 2 samples, got {len(data.samples)}")
    t0 = time.monotonic()
    ref = reference_statistics(data, extractors, batch=spec.batch, progress=_Progress(len(data.samples), "reference"))
    write_reference(ref, spec.out)
    log.info("reference statistics of %s (%d images, %.3g s) -> %s", spec.data, len(data.samples),
             time.monotonic() - t0, spec.out)
    return ref


def _check_batch(batch) -> None:
    if not (isinstance(batch, int) and batch >= 1):
        raise InputError(f"--batch: expected an integer >= 1, got {batch!r}")


def check_spec(spec: EvaluateSpec) -> None:
    """The flags that need no file: exactly one of --model / --samples, counts, sampler, guidance."""
    if (spec.model is None) == (spec.samples is None):
        raise InputError("--model: give exactly one of --model and --samples")
    if not (isinstance(spec.n_samples, int) and spec.n_samples >= 2):
        raise InputError(f"--n-samples: expected an integer >= 2, like 50000, got {spec.n_samples!r}")
    if not (isinstance(spec.seeds, int) and spec.seeds >= 1):
        raise InputError(f"--seeds: expected an integer >= 1 (runs of --n-samples each), got {spec.seeds!r}")
    if spec.sampler not in SAMPLERS:
        raise InputError(f"--sampler: expected one of {', '.join(SAMPLERS)} (EDM Heun), got {spec.sampler!r}")
    _check_batch(spec.batch)
    if spec.samples is not None:
        for flag, given in (("--guidance", spec.guidance != 1), ("--guide-model", spec.guide_model is not None),
                            ("--ema", spec.ema != "auto"), ("--engine", spec.engine.kind != "local"),
                            ("--vae", spec.vae is not None)):
            if given:
                raise InputError(f"{flag}: only with --model (--samples scores the images as they are)")
    if spec.latent_stats is not None and spec.vae is None:
        raise InputError("--latent-stats: only with --vae (the statistics un-whiten a latent model's samples)")
    if spec.guide_model is not None and spec.guidance == 1:
        raise InputError("--guide-model: needs --guidance S other than 1 (at 1 the guide is not used)")


def _load_samples(src: str):
    from lossfloor.data import load

    try:
        data = load(src)
    except InputError as e:
        raise InputError(f"--samples {e}") from None
    if len(data.samples) < 2:
        raise InputError(f"--samples {src}: expected at least 2 images, got {len(data.samples)}")
    return data


def _latents(spec: EvaluateSpec):
    """--vae's config and the latent statistics (--latent-stats, else EDM2's constants); None without --vae."""
    if spec.vae is None:
        return None
    from lossfloor.data.edm2 import EDM2_STATS
    from lossfloor.data.vae import check_vae_folder
    from lossfloor.jobs.encode import latent_stats

    config = check_vae_folder(spec.vae)
    return config, EDM2_STATS if spec.latent_stats is None else latent_stats(spec.latent_stats, "--latent-stats")


def _sample_shape(spec: EvaluateSpec, model_shape, ref, vae: dict | None) -> tuple[int, ...]:
    """The shape the model samples (module docstring): its own where its files say it (lossfloor runs, EDM2
    snapshots), else the reference images', or with --vae the latents that decode to the reference's shape."""
    from lossfloor.data.vae import downsampling

    if vae is None:
        shape = model_shape or tuple(ref.shape)
        if shape[0] not in (1, 3):
            raise InputError(f"--model {spec.model}: a latent model (samples of shape {shape}): give --vae DIR, the "
                             "data set's VAE (diffusers AutoencoderKL), to decode its samples to images")
        return shape
    f, channels = downsampling(vae), vae.get("latent_channels", 4)
    if model_shape is not None and model_shape[0] != channels:
        what = "is a pixel model" if model_shape[0] in (1, 3) else f"samples {model_shape[0]} channels"
        raise InputError(f"--vae {spec.vae}: decodes {channels}-channel latents, but --model {spec.model} {what} "
                         f"(samples of shape {model_shape})")
    shape = model_shape or (channels, ref.shape[1] // f, ref.shape[2] // f)
    decoded = (vae.get("out_channels", 3), f * shape[1], f * shape[2])
    if decoded != tuple(ref.shape):
        raise InputError(f"--vae {spec.vae}: decodes the model's latents {shape} to images of shape {decoded}, but "
                         f"--reference-stats {spec.reference_stats} holds statistics of images of shape "
                         f"{tuple(ref.shape)}")
    return shape


def _work(spec: EvaluateSpec, ref, latents=None):
    """The SampleWork of a model evaluation, checked: shape, latents (`_latents`), labels, one forward pass."""
    import torch

    from lossfloor.diagnose.sampling import SampleWork, load_sampler

    main = {"spec": spec.model, "ema": spec.ema, "prediction": spec.prediction, "process": spec.process,
            "precision": spec.precision}
    guide = None
    if spec.guide_model is not None:
        guide = {"spec": spec.guide_model, "ema": spec.guide_ema, "precision": spec.precision}
        if Path(spec.guide_model).is_file() and Path(spec.guide_model).name != "state.pt":  # a network file:
            guide.update(prediction=spec.prediction, process=spec.process)  # the model's --prediction, --process
    sampler = load_sampler(main, guide=guide, scale=spec.guidance, device=spec.device)
    shape = _sample_shape(spec, sampler.model.sample_shape, ref, None if latents is None else latents[0])
    if latents is None:
        ref.check({}, shape=shape, path=spec.reference_stats)
    probs = None
    if sampler.label_dim:
        probs = ref.class_probs()
        if probs is None:
            raise InputError(f"--model {spec.model}: class-conditional ({sampler.label_dim} classes), but the data of "
                             f"--reference-stats {spec.reference_stats} has no labels to draw them from")
        if len(probs) > sampler.label_dim:
            raise InputError(f"--model {spec.model}: {sampler.label_dim} classes, but the data of --reference-stats "
                             f"has {len(probs)}")
        probs = probs + (0.0,) * (sampler.label_dim - len(probs))
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)).to(spec.device)
    labels = None if not sampler.label_dim else torch.zeros(2, dtype=torch.int64, device=spec.device)
    with torch.no_grad():
        D = sampler.denoiser(x * spec.settings.sigma_max, torch.full((2,), spec.settings.sigma_max,
                                                                     device=spec.device), labels)
    if tuple(D.shape) != tuple(x.shape):
        raise InputError(f"--model {spec.model}: output of shape {tuple(D.shape[1:])} for samples of shape {shape} "
                         f"({'the latents of ' if latents else ''}the reference statistics' images)")
    if not torch.isfinite(D).all():
        raise InputError(f"--model {spec.model}: outputs NaN or inf at σ = {spec.settings.sigma_max:g}")
    work = SampleWork(main=main, guide=guide, scale=float(spec.guidance), features=spec.features, shape=tuple(shape),
                      class_probs=probs, sampler=spec.settings, batch=spec.batch, vae=spec.vae,
                      latent_stats=None if latents is None else latents[1])
    return work


def _stamp(path: str) -> list:
    """What tells a model file or run folder changed since a block was saved: its path and mtime."""
    p = Path(path)
    return [str(p.absolute()), p.stat().st_mtime_ns]


def _block_size(n: int, batch: int) -> int:
    """Whole batches, at most MAX_BLOCKS blocks per seed."""
    per = max(1, math.ceil(math.ceil(n / batch) / MAX_BLOCKS))
    return per * batch


def _save_sums(path: Path, sums: dict[str, FeatureSums]) -> None:
    from lossfloor.atomic import write_npz

    arrays = {}
    for k, s in sums.items():
        arrays[f"count_{k}"], arrays[f"total_{k}"], arrays[f"outer_{k}"] = np.array(s.count), s.total, s.outer
    write_npz(path, arrays)


def _read_sums(path: Path, metrics) -> dict[str, FeatureSums] | None:
    from lossfloor.train.metrics import FeatureSums

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: FeatureSums(count=int(z[f"count_{k}"]), total=z[f"total_{k}"], outer=z[f"outer_{k}"])
                    for k in metrics}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # a missing or damaged block is computed again


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "per_seed": [float(x) for x in v]}


def evaluate(spec: EvaluateSpec) -> dict:
    """Run the evaluation (module docstring); returns the result written to OUT/metrics.json."""
    from lossfloor.atomic import check_writable, output_folder, write_json
    from lossfloor.data.vae import WEIGHTS
    from lossfloor.devices import check_device
    from lossfloor.hashing import config_hash
    from lossfloor.train.metrics import feature_extractors, image_sums
    from lossfloor.train.quality import ReferenceStats, fd_metrics, read_reference, write_reference

    check_spec(spec)
    check_writable(spec.out, "--out", folder=True)
    check_device(spec.device)
    extractors = feature_extractors(spec.features, device=spec.device)
    ref = read_reference(spec.reference_stats)
    fingerprint = None
    if spec.data is not None:
        fingerprint = _data_fingerprint(spec.data)
    ref.check(extractors, shape=ref.shape, fingerprint=fingerprint, path=spec.reference_stats)
    t0 = time.monotonic()
    out = Path(spec.out)
    if spec.samples is not None:
        data = _load_samples(spec.samples)
        ref.check(extractors, shape=data.samples.shape[1:], path=spec.reference_stats)
        with output_folder(out, "--out"):
            sums = image_sums(extractors, data.samples, batch=spec.batch)
            per_seed = [sums]
            seeds = [0]
            n = len(data.samples)
    else:
        latents = _latents(spec)
        work = _work(spec, ref, latents)
        stamped = [spec.model, spec.guide_model, spec.vae and str(Path(spec.vae).expanduser() / WEIGHTS)]
        key = config_hash({"work": asdict(work), "networks": {k: ex.network_sha256 for k, ex in extractors.items()},
                           "n": spec.n_samples, "device": spec.engine.device or spec.device,
                           "models": [_stamp(p) for p in stamped if p]})
        seeds, n = list(range(spec.seeds)), spec.n_samples
        with output_folder(out, "--out"):
            try:
                per_seed = _sample_seeds(work, spec, extractors, out / "work" / key, seeds)
            except InputError:  # the model failed mid-way (NaN samples, an exception): nothing is kept
                shutil.rmtree(out / "work", ignore_errors=True)
                raise
    elapsed = time.monotonic() - t0
    result: dict = {"metrics": list(extractors), "seeds": seeds, "n_samples": n,
                    "reference_stats": str(spec.reference_stats), "dataset_fingerprint": ref.fingerprint,
                    "features": {k: ex.spec for k, ex in extractors.items()},
                    "network_sha256": {k: ex.network_sha256 for k, ex in extractors.items()}}
    values = [fd_metrics(s, ref) for s in per_seed]
    for k in extractors:
        result[k] = _summary([v[k] for v in values])
    if spec.model is not None:
        s = spec.settings
        result.update({"model": spec.model, "sampler": spec.sampler, "steps": s.num_steps, "sigma_min": s.sigma_min,
                       "sigma_max": s.sigma_max, "rho": s.rho, "ema": spec.ema, "guidance": spec.guidance,
                       "guide_model": spec.guide_model, "vae": spec.vae,
                       "latent_stats": None if spec.vae is None else
                       {"source": spec.latent_stats or "EDM2's SD-VAE constants", **work.latent_stats.to_dict()},
                       "images_per_second": n * len(seeds) / max(elapsed, 1e-9)})
    else:
        result["samples"] = spec.samples
    files = [write_json(out / METRICS_FILE, result)]
    for seed, sums in zip(seeds, per_seed):
        stats = ReferenceStats(fingerprint="", source=spec.model or spec.samples, shape=tuple(ref.shape),
                               class_counts=None, extractors={k: ref.extractors[k] for k in sums},
                               stats={k: (v.count, *v.statistics()) for k, v in sums.items()})
        files.append(write_reference(stats, out / f"samples-seed{seed}.stats.npz"))
    shutil.rmtree(out / "work", ignore_errors=True)
    if spec.tracking is not None:
        from lossfloor.tracking.evaluate import log_evaluation

        params = {"model": spec.model, "samples": spec.samples, "reference_stats": spec.reference_stats,
                  "features": spec.features, "n_samples": n, "seeds": len(seeds), "dataset_fingerprint": ref.fingerprint,
                  **({k: result[k] for k in ("steps", "sigma_min", "sigma_max", "rho", "ema", "guidance", "guide_model",
                                             "vae")}
                     if spec.model is not None else {}),
                  "latent_stats": result["latent_stats"]["source"] if spec.vae is not None else None}
        run_id = log_evaluation(result, [*files, spec.reference_stats], params=params,
                                experiment=spec.tracking.experiment, run_name=spec.tracking.run_name,
                                tracking_uri=spec.tracking.uri)
        log.info("logged MLflow run %s (experiment %s)", run_id, spec.tracking.experiment)
    return result


def _data_fingerprint(src: str) -> str:
    from lossfloor.data import load

    try:
        return load(src).fingerprint
    except InputError as e:
        raise InputError(f"--data {e}") from None


def _sample_seeds(work, spec: EvaluateSpec, extractors, folder: Path, seeds: list[int]) -> list[dict]:
    """Each seed's feature sums: finished blocks read from `folder`, the others computed (here or on Ray)
    and saved as they finish; summed in block order."""
    from lossfloor.atomic import write_json
    from lossfloor.train.quality import blocks

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "work.json", asdict(work))
    bounds = blocks(spec.n_samples, _block_size(spec.n_samples, spec.batch))
    totals: dict[int, dict] = {}
    done: dict[tuple[int, int, int], dict] = {}
    for seed in seeds:
        total = _read_sums(folder / f"seed{seed}.npz", extractors)
        if total is not None:
            totals[seed] = total
            continue
        for lo, hi in bounds:
            part = _read_sums(folder / f"seed{seed}-{lo:09d}-{hi:09d}.npz", extractors)
            if part is not None:
                done[(seed, lo, hi)] = part
    todo = [(s, lo, hi) for s in seeds if s not in totals for lo, hi in bounds if (s, lo, hi) not in done]
    if done or totals:
        log.info("evaluate: resuming from %s: %d blocks and %d seeds done, %d blocks to go", folder, len(done),
                 len(totals), len(todo))
    progress = _Progress(sum(hi - lo for _, lo, hi in todo), "samples", rate=True)

    def close(seed: int) -> None:
        """A seed whose blocks are all done: its total (in block order) saved, its blocks removed."""
        total = done[(seed, *bounds[0])]
        for a, b in bounds[1:]:
            total = {k: total[k] + done[(seed, a, b)][k] for k in total}
        _save_sums(folder / f"seed{seed}.npz", total)
        totals[seed] = total
        for a, b in bounds:
            (folder / f"seed{seed}-{a:09d}-{b:09d}.npz").unlink(missing_ok=True)
            del done[(seed, a, b)]

    def finish(block, sums) -> None:
        seed, lo, hi = block
        _save_sums(folder / f"seed{seed}-{lo:09d}-{hi:09d}.npz", sums)
        done[block] = sums
        progress.add(hi - lo)
        if all((seed, a, b) in done for a, b in bounds):
            close(seed)

    for seed in seeds:  # seeds whose blocks were all done before an interruption
        if seed not in totals and all((seed, a, b) in done for a, b in bounds):
            close(seed)
    if spec.engine.kind == "local":
        compute = work.build(spec.device) if todo else None
        for block in todo:
            finish(block, compute(*block))
    else:
        from lossfloor.ray.cluster import ray_session  # Ray only here
        from lossfloor.ray.evaluate import RayBlocks

        with ray_session(spec.engine.address):
            for block, sums in RayBlocks(work.build, spec.engine).run(todo):
                finish(block, sums)
    return [totals[s] for s in seeds]


class _Progress:
    """A log line every PROGRESS_SECONDS: done, rate (images/s) and ETA."""

    def __init__(self, total: int, what: str, rate: bool = False):
        self.total, self.what, self.done = total, what, 0
        self.t0 = self.last = time.monotonic()

    def add(self, k: int) -> None:
        self(self.done + k)

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or done == self.total:
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            log.info("evaluate: %d/%d %s (%.0f%%), %.3g images/s, ETA %.0f s", done, self.total, self.what,
                     100 * done / max(self.total, 1), rate, (self.total - done) / max(rate, 1e-9))


__all__ = ["EXPERIMENT", "METRICS_FILE", "EvaluateSpec", "ReferenceSpec", "check_spec", "evaluate", "reference"]
