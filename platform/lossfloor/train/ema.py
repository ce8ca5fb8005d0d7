"""Power-function EMA and post-hoc EMA reconstruction (EDM2 paper §3.1-3.2; edm2.md §5).

A power-function EMA at training time t (in images) averages the weights with the profile
    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   on [0, t],
whose relative standard deviation (its std over t) is
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
It is tracked with theta_hat <- beta theta_hat + (1 - beta) theta after each step, beta = (1 - delta/t)^(gamma+1),
t = images seen after the step, delta = images in the step (so beta = 0 at the first step).

Post-hoc reconstruction: snapshots theta_hat_i with profiles p_i (t_i, gamma_i) are combined,
theta_out = sum_i x_i theta_hat_i, where x is the least-squares projection of the target profile on
the snapshot profiles in L2[0, inf): A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_out>, then x is
normalised to sum 1 (edm2.md §5). For ta <= tb the inner product is
    <p_a, p_b> = (gamma_a+1)(gamma_b+1) (ta/tb)^gamma_b / ((gamma_a+gamma_b+1) tb)
(integrate the product of the two power laws over [0, ta]; symmetric for ta > tb).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lossfloor.errors import InputError

SIGMA_REL_MAX = 1 / math.sqrt(12)  # sigma_rel at gamma = 0 (a uniform average); larger needs gamma < 0


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) (EDM2 paper Eq. 3 / edm2.md §5)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma: the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (edm2.md §5).

    That cubic is sigma_rel(gamma)^2 = s^2 multiplied out; 0 < sigma_rel < 1/sqrt(12) gives gamma > 0.
    """
    check_sigma_rel(sigma_rel, "sigma_rel")
    inv = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    return float(real.max())


def check_sigma_rel(value, field: str) -> float:
    """InputError unless 0 < value < 1/sqrt(12) (a power-function EMA with gamma > 0)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and 0 < value < SIGMA_REL_MAX):
        raise InputError(f"{field}: expected a relative EMA width in (0, {SIGMA_REL_MAX:.4f}), like 0.05, got {value!r}")
    return float(value)


# --- Which weights to evaluate: the `--ema` choice of `lossfloor diagnose` and of the scaling study ---


@dataclass(frozen=True, kw_only=True)
class EmaChoice:
    """Which weights of a run are evaluated: "raw" (the trained weights), "tracked" (the EMA of width
    sigma_rel the loop kept), "posthoc" (the EMA of width sigma_rel reconstructed from the run's EMA
    snapshots, `posthoc_ema`), or "auto" (`diagnose`: the weights the run's own evaluation used)."""

    kind: str
    sigma_rel: float | None = None

    def __str__(self) -> str:
        """The flag's spelling: raw | auto | 0.1 | posthoc:0.1."""
        if self.kind == "tracked":
            return f"{self.sigma_rel:g}"
        return f"posthoc:{self.sigma_rel:g}" if self.kind == "posthoc" else self.kind


def parse_ema(text: str, *, flag: str = "--ema", auto: bool = False) -> EmaChoice:
    """`raw`, a tracked width (`0.1`), `posthoc:SIGMA_REL` with 0 < SIGMA_REL < 1/sqrt(12), or (auto=True)
    `auto`. Only the spelling and the posthoc range are checked here (before any run is read); whether a
    run has that EMA is `ema_unavailable`'s. InputError naming `flag`."""
    text = str(text).strip()
    if text == "raw" or (auto and text == "auto"):
        return EmaChoice(kind=text)
    posthoc = text.startswith("posthoc:")
    try:
        sigma_rel = float(text.split(":", 1)[1] if posthoc else text)
    except ValueError:
        raise InputError(f"{flag}: {text} is not {'auto, ' if auto else ''}raw, a tracked sigma_rel or "
                         "posthoc:SIGMA_REL") from None
    if not posthoc:
        return EmaChoice(kind="tracked", sigma_rel=sigma_rel)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise InputError(f"{flag}: {text} is out of range: SIGMA_REL must be in (0, {SIGMA_REL_MAX:.4f})")
    return EmaChoice(kind="posthoc", sigma_rel=sigma_rel)


def ema_unavailable(choice: EmaChoice, *, tracked: Sequence[float], snapshots: bool) -> str | None:
    """Why a run that tracks the widths `tracked` and keeps EMA snapshots (or not) cannot give `choice`
    ("needs EMA snapshots", "is not tracked"), else None."""
    if choice.kind == "posthoc" and not snapshots:
        return "needs EMA snapshots"
    if choice.kind == "tracked" and not any(math.isclose(s, choice.sigma_rel) for s in tracked):
        return "is not tracked"
    return None


def ema_beta(gamma: float, n_img: int, batch_n_img: int) -> float:
    """beta = (1 - delta/t)^(gamma+1), t = images after the step, delta = images in it (edm2.md §5)."""
    return (1.0 - batch_n_img / n_img) ** (gamma + 1)


class PowerFunctionEMA:
    """One power-function EMA per sigma_rel of a module's state (parameters averaged, buffers copied).

    States live on the module's device in fp32. `state_dict()` is a plain dict of tensors and floats.
    """

    def __init__(self, module: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = tuple(check_sigma_rel(s, "ema_stds") for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self._param_names = {name for name, _ in module.named_parameters()}
        self.states = [
            {k: v.detach().to(torch.float32).clone() for k, v in module.state_dict().items()}
            for _ in self.sigma_rels
        ]

    @torch.no_grad()
    def update(self, module: nn.Module, n_img: int, batch_n_img: int) -> None:
        """theta_hat <- beta theta_hat + (1 - beta) theta for every EMA, after a step that brought the
        image count to n_img (edm2.md §5)."""
        current = module.state_dict()
        for gamma, state in zip(self.gammas, self.states):
            beta = ema_beta(gamma, n_img, batch_n_img)
            for name, ema in state.items():
                value = current[name].detach().to(torch.float32)
                if name in self._param_names:
                    ema.lerp_(value, 1.0 - beta)
                else:
                    ema.copy_(value)

    def state(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The averaged state dict of the EMA tracked at sigma_rel (load it into a fresh module)."""
        for s, state in zip(self.sigma_rels, self.states):
            if math.isclose(s, sigma_rel, rel_tol=1e-9):
                return state
        raise InputError(f"eval_ema: {sigma_rel} is not a tracked EMA width; expected one of {self.sigma_rels}")

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "states": [dict(s) for s in self.states]}

    def load_state_dict(self, state: Mapping) -> None:
        saved = tuple(float(s) for s in state["sigma_rels"])
        if saved != self.sigma_rels:
            raise InputError(f"ema_stds: the checkpoint tracks {saved}, the config asks for {self.sigma_rels}")
        for mine, theirs in zip(self.states, state["states"]):
            for k, v in mine.items():
                v.copy_(theirs[k])

    def snapshot(self, n_img: int) -> dict:
        """A post-hoc snapshot: every EMA with its (n_img, gamma), as a plain dict (CPU tensors)."""
        return {
            "n_img": int(n_img),
            "emas": [
                {"sigma_rel": s, "gamma": g, "state": {k: v.detach().cpu().clone() for k, v in st.items()}}
                for s, g, st in zip(self.sigma_rels, self.gammas, self.states)
            ],
        }


# --- Post-hoc reconstruction (EDM2 paper §3.2, Algorithm in appendix; edm2.md §5) -------------------


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> of two normalised power-function profiles (module docstring); broadcasts, float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    # (t_min/t_max)^(gamma of the profile that ends later): gamma_b if ta < tb, else gamma_a
    exponent = np.where(t_a < t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) * (t_min / t_max) ** exponent / ((g_a + g_b + 1) * t_max)


def posthoc_coefficients(t_snap, gamma_snap, t_out: float, gamma_out: float) -> np.ndarray:
    """x with A x = b (least squares), normalised to sum 1: theta_out = sum_i x_i theta_hat_i (edm2.md §5)."""
    t = np.asarray(t_snap, dtype=np.float64)
    g = np.asarray(gamma_snap, dtype=np.float64)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # (n, n)
    b = profile_inner(t, g, t_out, gamma_out)  # (n,)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


def posthoc_ema(snapshots: Sequence[Mapping], *, sigma_rel: float, n_img: int | None = None) -> dict:
    """Reconstruct the EMA of width sigma_rel at n_img (default: the latest snapshot) from snapshots.

    snapshots: dicts as written by `PowerFunctionEMA.snapshot` (or read by `read_snapshots`). Every EMA
    of every snapshot taken at or before n_img is one basis profile; later snapshots are left out, so the
    result is the network as it could be reconstructed at n_img, from the weights trained by then (they
    would otherwise enter through the least squares). Returns a state dict (fp32, CPU).
    """
    basis = [(s["n_img"], e["gamma"], e["state"]) for s in snapshots for e in s["emas"]]
    if not basis:
        raise InputError("snapshots: expected at least one EMA snapshot (set snapshot_every_n_img)")
    t_out = max(t for t, _, _ in basis) if n_img is None else int(n_img)
    basis = [b for b in basis if b[0] <= t_out]
    if not basis:
        raise InputError(f"snapshots: none taken at or before {t_out} images, the point to reconstruct")
    x = posthoc_coefficients([b[0] for b in basis], [b[1] for b in basis], t_out, sigma_rel_to_gamma(sigma_rel))
    out = {}
    for name, first in basis[0][2].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for coeff, (_, _, state) in zip(x, basis):
                acc += float(coeff) * state[name].to(torch.float64)
            out[name] = acc.to(torch.float32)
        else:
            out[name] = first.clone()
    return out
