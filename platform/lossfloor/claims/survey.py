"""σ* and the plateau of several data sets (paper Fig. 1d: J* ≈ 0 below σ*, then rises and plateaus at
the data's variance J*(∞); both differ across data sets).

Per data set: σ* as the bracket the σ grid and J*'s 95 % intervals allow (`floor.table.sigma_star_bracket`:
the crossing of 1e-3·J*(∞)), and the plateau J*(∞) = E||x0 - E x0||² — exact, from the data — also per
value (÷ D) so that data sets of different sizes compare.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from lossfloor.claims.seeds import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from lossfloor.floor.table import sigma_star, sigma_star_bracket

PLATEAU_RTOL = 0.01  # plateaus per value closer than 1 % count as the same


def survey_row(name: str, est, n: int, dim: int) -> dict:
    """What the claim needs of one data set's estimate (`floor.Estimate`) of n samples of dim values."""
    tv = float(est.total_variance)
    low, high = sigma_star_bracket(est.sigmas, est.ci_low, est.ci_high, tv)
    return {"data": name, "n": int(n), "dim": int(dim),
            "estimator": est.config.estimator, "plateau": tv, "plateau_per_value": tv / dim,
            "sigma_star": sigma_star(est.sigmas, est.j_star, tv), "sigma_star_low": low, "sigma_star_high": high,
            "sigma": est.sigmas.tolist(), "j_star": est.j_star.tolist(), "ci_low": est.ci_low.tolist(),
            "ci_high": est.ci_high.tolist()}


def brackets_disjoint(a: dict, b: dict) -> bool:
    """Whether two data sets' σ* brackets cannot hold the same σ* (an open end can hold anything)."""
    def bounds(r):
        return (r["sigma_star_low"] if r["sigma_star_low"] is not None else 0.0,
                r["sigma_star_high"] if r["sigma_star_high"] is not None else math.inf)
    (alo, ahi), (blo, bhi) = bounds(a), bounds(b)
    return ahi < blo or bhi < alo


def survey_claim(rows: list[dict]) -> dict:
    """"σ* and the plateau differ across data sets": per pair, whether the σ* brackets are disjoint and
    the plateaus per value differ by more than PLATEAU_RTOL. Reproduced when every pair differs in both;
    not reproduced when some pair's plateaus agree and their σ* brackets overlap; else inconclusive."""
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        pa, pb = a["plateau_per_value"], b["plateau_per_value"]
        pairs.append({"pair": [a["data"], b["data"]], "sigma_star_differs": brackets_disjoint(a, b),
                      "plateau_ratio": pa / pb if pb > 0 else math.inf,
                      "plateau_differs": bool(abs(pa - pb) > PLATEAU_RTOL * max(pa, pb))})
    if pairs and all(p["sigma_star_differs"] and p["plateau_differs"] for p in pairs):
        verdict = REPRODUCED
    elif any(not p["sigma_star_differs"] and not p["plateau_differs"] for p in pairs):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return {"verdict": verdict, "pairs": pairs,
            "sigma_star": {r["data"]: [r["sigma_star_low"], r["sigma_star_high"]] for r in rows},
            "plateau_per_value": {r["data"]: r["plateau_per_value"] for r in rows},
            "order_of_sigma_star": [r["data"] for r in sorted(rows, key=lambda r: r["sigma_star"] or np.inf)]}


def _bracket(low, high) -> str:
    return f"[{'<' if low is None else f'{low:.3g}'}, {'>' if high is None else f'{high:.3g}'}]"


def describe(rows: list[dict], grid: str) -> list[dict]:
    """The survey claim in words, with every number from the rows (`survey_claim`)."""
    c = survey_claim(rows)
    stars = "; ".join(f"{r['data']} {_bracket(r['sigma_star_low'], r['sigma_star_high'])}" for r in rows)
    plateaus = "; ".join(f"{r['data']} {r['plateau_per_value']:.3g}" for r in rows)
    data = "; ".join(f"{r['data']} (N = {r['n']}, D = {r['dim']}, {r['estimator']})" for r in rows)
    return [{"id": "sigma-star-plateau", "claim": "σ* and the plateau differ across data sets",
             "paper": "J* ≈ 0 below σ*, then rises and plateaus at the data's variance; σ* and the plateau differ "
                      "across data sets (Fig. 1d)",
             "measured": f"σ* (where J* crosses 1e-3·J*(∞), the bracket the grid and the 95 % intervals allow): "
                         f"{stars}; plateau J*(∞)/D: {plateaus}",
             "verdict": c["verdict"], "data": f"{data}; σ grid {grid}", "detail": c}]
