"""Thin Ray adapters around the core (DESIGN §2): the core never imports ray, these modules do.

    estimate_ray(samples, sigmas, EstimatorConfig(...), engine=RayEngine(workers=2))   # --engine ray
"""

from lossfloor.ray.estimate import RayEngine, RayRun, estimate_ray

__all__ = ["RayEngine", "RayRun", "estimate_ray"]
