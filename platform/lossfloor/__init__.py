"""lossfloor: estimate the optimal loss J*(sigma) of a diffusion model's data and use it.

Xu, Luo, Wang, He, Liu, "Diagnosing and Improving Diffusion Models by Estimating the Optimal Loss
Value" (ICLR 2026, arXiv 2506.13763). The core packages (diffusion, data, floor, models, train,
scaling) import only torch, numpy, scipy and pyarrow; `lossfloor.ray` and `lossfloor.tracking` adapt
them to Ray and MLflow.
"""

__version__ = "0.1.0"
