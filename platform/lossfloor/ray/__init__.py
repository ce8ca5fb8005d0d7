"""Thin Ray adapters around the core: the core never imports ray, these modules do.

    estimate_ray(samples, sigmas, EstimatorConfig(...), engine=Engine(kind="ray", workers=2))   # --engine ray

Every adapter runs where a `lossfloor.jobs.engine.Engine` says (passed in as it is, or its fields: the
settings are checked there, once); this package never imports `lossfloor.jobs`.

Modules (import the one you need; each pulls in only its part of Ray):
    lossfloor.ray.estimate   estimate_ray: the floor's batches on a Ray Data actor pool
    lossfloor.ray.train      train_on_ray: the training loop under Ray Train's TorchTrainer
    lossfloor.ray.sweep      schedule sweeps with Ray Tune (trials run train_on_ray)
    lossfloor.ray.diagnose   a diagnosis's σ × sample-batch blocks over Ray actors
    lossfloor.ray.encode     images encoded to VAE latents by Ray Data actors (one VAE each)
    lossfloor.ray.cluster    the one connection to a Ray cluster
"""

from lossfloor.ray.estimate import RayRun, estimate_ray

__all__ = ["RayRun", "estimate_ray"]
