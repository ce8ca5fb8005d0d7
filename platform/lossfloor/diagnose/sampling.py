"""A model to sample from, as `lossfloor evaluate` samples it: `load_model`'s denoiser, optionally guided.

    den = load_sampler({"spec": "runs/m"}, guide={"spec": "runs/xs-uncond"}, scale=1.4)

Guidance is EDM2's, D = D_guide + scale (D - D_guide) (`lossfloor.train.sampling.guided`): with an
unconditional guide model it is classifier-free guidance (EDM2 trains that guide separately; lossfloor
models have no label-dropout branch to guide with), with a smaller or less-trained conditional model of
the same classes it is autoguidance. Each side is loaded by `load_model` with its own keyword arguments
(spec, ema, prediction, process, precision), so a Ray worker rebuilds the same denoiser from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lossfloor.diagnose.models import Model, load_model
from lossfloor.errors import InputError


@dataclass(frozen=True, kw_only=True)
class Sampler:
    """The denoiser to sample and what it needs: label_dim > 0 (conditional) takes class labels."""

    denoiser: Callable
    model: Model
    guide: Model | None
    label_dim: int


def load_sampler(main: Mapping, *, guide: Mapping | None = None, scale: float = 1.0, device="cpu") -> Sampler:
    """The main model, guided by `guide` at `scale` (module docstring); InputError (one line) for a scale
    without a guide, a guide with other classes, or a conditional guide of an unconditional model."""
    from lossfloor.train.sampling import guided

    if not (isinstance(scale, (int, float)) and scale == scale and abs(scale) != float("inf")):
        raise InputError(f"--guidance: expected a finite number, like 1.4, got {scale!r}")
    model = load_model(**main, device=device)
    if guide is None:
        if scale != 1:
            raise InputError(f"--guidance {scale:g}: --model {model.spec} has no unconditional branch (lossfloor "
                             "trains without label dropout); give the guide as --guide-model: an unconditional model "
                             "(classifier-free guidance, as EDM2) or a smaller conditional one (autoguidance)")
        return Sampler(denoiser=model.denoiser, model=model, guide=None, label_dim=model.label_dim)
    g = load_model(**guide, device=device)
    if g.label_dim and g.label_dim != model.label_dim:
        raise InputError(f"--guide-model {g.spec}: conditional on {g.label_dim} classes, but --model {model.spec} has "
                         f"{model.label_dim}: a conditional guide must have the model's classes")
    den = guided(model.denoiser, g.denoiser, float(scale), guide_labels=bool(g.label_dim))
    return Sampler(denoiser=den, model=model, guide=g, label_dim=model.label_dim)




@dataclass(frozen=True, kw_only=True)
class SampleWork:
    """Everything a worker needs to compute blocks of an evaluation: `build(device)` loads the sampler, the
    extractors and a latent model's VAE (from its folder) once and returns
    compute(seed, start, stop) -> {metric: FeatureSums} (`lossfloor.train.quality.block_sums`)."""

    main: dict
    guide: dict | None = None
    scale: float = 1.0
    features: str
    shape: tuple[int, ...]
    class_probs: tuple[float, ...] | None = None
    sampler: object = None  # lossfloor.train.quality.SamplerSettings
    batch: int = 256
    vae: str | None = None  # a latent model's VAE folder: its samples are decoded to images before the features
    latent_stats: object = None  # the latents' lossfloor.data.edm2.LatentStats (un-whitening before decoding)

    def build(self, device) -> Callable:
        from dataclasses import replace

        from lossfloor.train.metrics import feature_extractors
        from lossfloor.train.quality import SamplerSettings, SampleSpec, block_sums

        sampler = load_sampler(self.main, guide=self.guide, scale=self.scale, device=device)
        extractors = feature_extractors(self.features, device=device)
        base = SampleSpec(shape=tuple(self.shape), class_probs=self.class_probs,
                          sampler=self.sampler or SamplerSettings())

        decode = None
        if self.vae is not None:
            import torch

            from lossfloor.data.vae import decode_latents, load_vae

            vae = load_vae(self.vae, device=device)

            def decode(x):
                return torch.from_numpy(decode_latents(vae, x.cpu().numpy(), self.latent_stats, batch=self.batch))

        def compute(seed: int, start: int, stop: int) -> dict:
            return block_sums(sampler.denoiser, extractors, replace(base, seed=seed), start=start, stop=stop,
                              batch=self.batch, device=device, decode=decode)
        return compute


__all__ = ["SampleWork", "Sampler", "load_sampler"]
