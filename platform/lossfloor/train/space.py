"""Search spaces over the optimal-loss schedule's fields, read from YAML (`lossfloor sweep --space`).

A space file maps `OptimalLossSchedule` field names to a distribution, or to a fixed value:

    w_max: {loguniform: [10, 1000]}     # log-uniform between the bounds (both > 0)
    varsigma: {uniform: [0.5, 2]}       # uniform between the bounds
    mu: {choice: [-4, -3, -2]}          # one of the listed values
    n_bins: {randint: [16, 64]}         # an integer, both bounds included
    uniform_mix: 0.1                    # fixed in every trial

Every bound and choice is checked against the field's own rules (the schedule's __post_init__), so a
space that parses can only produce valid single fields; `lo < hi` is required. Integer fields
(n_bins, halflife_n_img) take randint or choice, the boolean `uncertainty` takes choice.
Anything wrong raises InputError naming the file and the key.

Pure (numpy, yaml): `lossfloor.ray.sweep` turns a `SearchSpace` into Ray Tune / Optuna domains, and
`SearchSpace.sample(rng)` draws a configuration without Ray (random search, tests).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lossfloor.errors import InputError
from lossfloor.train.schedules import OptimalLossSchedule

DEFAULT_SPACE = Path(__file__).parent / "spaces" / "optimal_loss.yaml"  # shipped with the package
DISTRIBUTIONS = ("choice", "loguniform", "randint", "uniform")
SWEEPABLE = tuple(f.name for f in dataclasses.fields(OptimalLossSchedule))
INTEGER_FIELDS = ("n_bins", "halflife_n_img")
BOOLEAN_FIELDS = ("uncertainty",)
EXAMPLE = "w_max: {loguniform: [10, 1000]}"


@dataclass(frozen=True)
class Param:
    """One swept field: kind is one of DISTRIBUTIONS or "fixed"; args the bounds, choices or value."""

    kind: str
    args: tuple

    def to_dict(self):
        """The YAML form: {kind: [args...]} or the fixed value."""
        return self.args[0] if self.kind == "fixed" else {self.kind: list(self.args)}

    def sample(self, rng: np.random.Generator):
        """One value drawn with `rng` (plain Python types)."""
        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        lo, hi = self.args
        if self.kind == "uniform":
            return float(rng.uniform(lo, hi))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return int(rng.integers(lo, hi + 1))  # randint: both bounds included


@dataclass(frozen=True)
class SearchSpace:
    """The parsed space: field name -> Param, in file order; `source` names the file in messages."""

    params: dict[str, Param]
    source: str = "<space>"

    @property
    def swept(self) -> dict[str, Param]:
        """The fields drawn per trial (not fixed)."""
        return {k: p for k, p in self.params.items() if p.kind != "fixed"}

    @property
    def fixed(self) -> dict[str, object]:
        """The fields with one value in every trial."""
        return {k: p.args[0] for k, p in self.params.items() if p.kind == "fixed"}

    def to_dict(self) -> dict:
        """The space as the YAML mapping it was read from (JSON-able)."""
        return {k: p.to_dict() for k, p in self.params.items()}

    def sample(self, rng: np.random.Generator) -> dict:
        """One configuration: every field, swept ones drawn in file order."""
        return {k: p.sample(rng) for k, p in self.params.items()}

    def schedule(self, values: dict) -> OptimalLossSchedule:
        """The OptimalLossSchedule of one configuration (fields not in the space keep their defaults)."""
        return OptimalLossSchedule(**values)


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read and check a space file (module docstring); InputError naming the file and key on any problem."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        """YAML whose mappings refuse a key given twice (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # SafeLoader's own error names it
                if key in seen:
                    raise InputError(f"{path}: key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                     "give each field once")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: search space file not found (expected YAML like `{EXAMPLE}`)")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeys)  # safe: a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e.__class__.__name__})") \
            from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (expected YAML like `{EXAMPLE}`)") from None
    return parse_space(doc, source=str(path))


def parse_space(doc, *, source: str = "<space>") -> SearchSpace:
    """Check a space given as a mapping (what the YAML file holds)."""
    if doc is None:
        raise InputError(f"{source}: empty; expected a mapping of OptimalLossSchedule fields to distributions, "
                         f"like `{EXAMPLE}`")
    if not isinstance(doc, dict):
        raise InputError(f"{source}: expected a mapping of OptimalLossSchedule fields to distributions, like "
                         f"`{EXAMPLE}`, got {type(doc).__name__}")
    if not doc:
        raise InputError(f"{source}: no fields to sweep; expected e.g. `{EXAMPLE}`")
    params = {}
    for key, value in doc.items():
        if key not in SWEEPABLE:
            raise InputError(f"{source}: {key}: unknown field; expected one of the OptimalLossSchedule fields "
                             f"{', '.join(SWEEPABLE)}")
        params[key] = _parse_param(value, key, source)
    if not any(p.kind != "fixed" for p in params.values()):
        raise InputError(f"{source}: every field is fixed; give at least one a distribution, like `{EXAMPLE}`")
    return SearchSpace(params, source)


# --- One field -------------------------------------------------------------------------------------


def _parse_param(value, key: str, source: str) -> Param:
    where = f"{source}: {key}"
    if not isinstance(value, dict):
        if isinstance(value, (list, tuple)):
            raise InputError(f"{where}: a bare list; write {{choice: {list(value)}}} for a choice")
        _check_field(key, value, where)
        return Param("fixed", (value,))
    if len(value) != 1:
        raise InputError(f"{where}: expected one distribution like {{uniform: [0.5, 2]}}, got {value!r}")
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise InputError(f"{where}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        return _parse_choice(args, key, where)
    if key in BOOLEAN_FIELDS:
        raise InputError(f"{where}: a true/false field; use {{choice: [false, true]}}")
    if key in INTEGER_FIELDS and kind != "randint":
        raise InputError(f"{where}: an integer field; use {{randint: [lo, hi]}} or a choice, not {kind}")
    if key not in INTEGER_FIELDS and kind == "randint":
        raise InputError(f"{where}: randint is for the integer fields ({', '.join(INTEGER_FIELDS)}); "
                         "use uniform or loguniform")
    if not (isinstance(args, (list, tuple)) and len(args) == 2):
        raise InputError(f"{where}: {kind} expects two bounds [low, high], got {args!r}")
    lo, hi = args
    for bound in (lo, hi):
        if not _real(bound) or (kind == "randint" and not isinstance(bound, numbers.Integral)):
            what = "integer" if kind == "randint" else "finite number"
            raise InputError(f"{where}: {kind} bounds must be {what}s, got {bound!r}")
    if not lo < hi:
        raise InputError(f"{where}: {kind} needs low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise InputError(f"{where}: loguniform needs positive bounds, got [{lo}, {hi}]")
    for bound in (lo, hi):
        _check_field(key, bound, where)
    return Param(kind, (int(lo), int(hi)) if kind == "randint" else (float(lo), float(hi)))


def _parse_choice(args, key: str, where: str) -> Param:
    if not (isinstance(args, (list, tuple)) and len(args) > 0):
        raise InputError(f"{where}: choice expects a non-empty list of values, got {args!r}")
    for v in args:
        _check_field(key, v, where)
    return Param("choice", tuple(args))


def _check_field(key: str, value, where: str) -> None:
    """The schedule's own check of one value (OptimalLossSchedule.__post_init__)."""
    if key not in BOOLEAN_FIELDS and not (value is None or _real(value)):
        raise InputError(f"{where}: expected a number, got {value!r}")
    try:
        OptimalLossSchedule(**{key: value})
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


__all__ = ["DISTRIBUTIONS", "SWEEPABLE", "Param", "SearchSpace", "load_space", "parse_space"]
