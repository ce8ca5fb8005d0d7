"""The loss gap J(σ) − J*(σ) of any diffusion model: lossfloor runs, diffusers folders, TorchScript files.

    model = load_model("my-ddpm/")                  # or a run folder, or oracle.pt with prediction=/process=
    d = measure(model, data.samples, data.labels, sigmas, jstar=table.x0(), fingerprint=data.fingerprint)

    predictions  what a network predicts -> its x0 estimate (the targets of lossfloor.diffusion)
    models       the model kinds, each as a denoiser D(x_hat, σ) in VE x0 coordinates
    measure      the per-σ loss, J*, gap and totals under two weightings; the diagnosis table

Core: torch, numpy, pyarrow (and diffusers for diffusers folders); no Ray, MLflow or plotly.
"""

from lossfloor.diagnose.measure import Diagnosis, format_diagnosis, measure, read_diagnosis, write_diagnosis
from lossfloor.diagnose.models import Model, Weighting, load_model
from lossfloor.diagnose.predictions import PREDICTIONS, coefficients, to_x0

__all__ = ["PREDICTIONS", "Diagnosis", "Model", "Weighting", "coefficients", "format_diagnosis", "load_model",
           "measure", "read_diagnosis", "to_x0", "write_diagnosis"]
