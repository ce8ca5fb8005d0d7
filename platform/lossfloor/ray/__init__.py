"""Thin Ray adapters around the core (DESIGN §2): the core never imports ray, these modules do.

    estimate_ray(samples, sigmas, EstimatorConfig(...), engine=RayEngine(workers=2))   # --engine ray

Modules (import the one you need; each pulls in only its part of Ray):
    lossfloor.ray.estimate   estimate_ray: the floor's batches on a Ray Data actor pool
    lossfloor.ray.train      train_on_ray: the training loop under Ray Train's TorchTrainer
    lossfloor.ray.sweep      schedule sweeps with Ray Tune (trials run train_on_ray)
"""

from lossfloor.ray.estimate import RayEngine, RayRun, estimate_ray

__all__ = ["RayEngine", "RayRun", "estimate_ray"]
