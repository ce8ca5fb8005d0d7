"""The J* table's one lookup (`JStarX0.at`) and its one data check (`JStarX0.check_data`), on hand-made tables.

Oracles: the rule of `at`'s docstring computed by hand: a σ within SIGMA_RTOL of a grid point reads its row;
between grid points v_k + (ln σ - ln σ_k) / (ln σ_{k+1} - ln σ_k) (v_{k+1} - v_k); beyond the grid an error
("error") or the end row ("clamp").
"""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from lossfloor.errors import InputError
from lossfloor.floor.table import SIGMA_RTOL, JStarTable

GRID = [0.5, 2.0, 8.0]
J = [0.01, 0.1, 0.3]
STDERR = [1e-4, 1e-3, 3e-3]
LOW = [0.009, 0.098, 0.29]
HIGH = [0.011, 0.102, 0.31]


def hand_table(sigma=GRID, j=J, *, fingerprint="sha256:abc", latents="", conditional=False, labels=""):
    n = len(sigma)
    cols = {"sigma": sigma, "j_star_x0": j, "stderr_x0": STDERR[:n], "ci_low_x0": LOW[:n], "ci_high_x0": HIGH[:n],
            "target": ["x0"] * n, "estimator": ["knn"] * n, "dataset_fingerprint": [fingerprint] * n,
            "latents": [latents] * n, "total_variance": [1.0] * n}
    table = pa.table(cols)
    if conditional:
        table = table.replace_schema_metadata({"class_conditional": "true", "labels_fingerprint": labels})
    return JStarTable(table, source="hand.parquet").x0()


def by_hand(sigma, values=J):
    """The docstring's rule between grid points, for σ strictly inside (GRID[k], GRID[k+1])."""
    k = max(i for i in range(len(GRID) - 1) if GRID[i] < sigma)
    t = (math.log(sigma) - math.log(GRID[k])) / (math.log(GRID[k + 1]) - math.log(GRID[k]))
    return values[k] + t * (values[k + 1] - values[k])


@pytest.mark.parametrize("outside", ["error", "clamp"])
def test_a_grid_point_reads_its_row_and_between_points_the_lookup_is_linear_in_log_sigma(outside):
    x0 = hand_table()
    for k, s in enumerate(GRID):
        assert x0.at(s, outside=outside) == (J[k], LOW[k], HIGH[k])  # the row itself, exactly
        # a σ written with fewer digits (within SIGMA_RTOL) is the same grid point
        assert x0.at(s * (1 + 0.5 * SIGMA_RTOL), outside=outside) == (J[k], LOW[k], HIGH[k])
        assert x0.at(s * (1 - 0.5 * SIGMA_RTOL), outside=outside) == (J[k], LOW[k], HIGH[k])
    for s in (0.6, 1.0, 1.7, 2.5, 4.0, 7.9):
        got = x0.at(s, outside=outside, columns=("j_star", "ci_low", "ci_high", "stderr"))
        assert got == pytest.approx((by_hand(s), by_hand(s, LOW), by_hand(s, HIGH), by_hand(s, STDERR)), rel=1e-12)
    # σ = 1 halfway between 0.5 and 2 in ln σ
    assert x0.at(1.0, outside=outside)[0] == pytest.approx((J[0] + J[1]) / 2, rel=1e-12)


def test_beyond_the_grid_error_refuses_and_clamp_reads_the_end_row():
    x0 = hand_table()
    for s in (0.1, 0.5 * (1 - 2 * SIGMA_RTOL), 8.0 * (1 + 2 * SIGMA_RTOL), 100.0, 0.0, -1.0):
        with pytest.raises(InputError, match=r"J\* table hand.parquet: σ = .* is outside its grid \[0.5, 8\]"):
            x0.at(s)
        with pytest.raises(InputError, match="outside its grid"):
            x0.at(np.array([1.0, s]), outside="error")  # one σ outside refuses the whole lookup
    for s in (0.1, 0.5 * (1 - 2 * SIGMA_RTOL), 1e-6):
        assert x0.at(s, outside="clamp") == (J[0], LOW[0], HIGH[0])
    for s in (8.0 * (1 + 2 * SIGMA_RTOL), 100.0, 1e6):
        assert x0.at(s, outside="clamp") == (J[-1], LOW[-1], HIGH[-1])
    with pytest.raises(ValueError, match="outside"):
        x0.at(1.0, outside="extrapolate")


def test_the_lookup_takes_numbers_arrays_and_tensors_and_gives_the_same_kind_back():
    x0 = hand_table()
    s = np.array([[0.6, 2.0], [4.0, 100.0]])
    j, lo = x0.at(s, outside="clamp", columns=("j_star", "ci_low"))
    assert isinstance(j, np.ndarray) and j.shape == (2, 2) and j.dtype == np.float64
    np.testing.assert_allclose(j, [[by_hand(0.6), J[1]], [by_hand(4.0), J[2]]], rtol=1e-12)
    np.testing.assert_allclose(lo, [[by_hand(0.6, LOW), LOW[1]], [by_hand(4.0, LOW), LOW[2]]], rtol=1e-12)
    (t,) = x0.at(torch.tensor(s, dtype=torch.float32), outside="clamp", columns=("j_star",))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (2, 2)
    np.testing.assert_allclose(t.numpy(), j, rtol=1e-6)
    assert all(isinstance(v, float) for v in x0.at(np.float64(1.0)))


def test_a_one_point_grid_reads_its_row_at_the_point_and_beyond_only_when_clamped():
    x0 = hand_table(sigma=[2.0], j=[J[0]])  # J* within its interval (0.1 outside [LOW[0], HIGH[0]] is refused)
    assert x0.at(2.0) == (J[0], LOW[0], HIGH[0])
    assert x0.at(2.0 * (1 + 0.5 * SIGMA_RTOL))[0] == J[0]
    assert x0.at(0.1, outside="clamp")[0] == J[0] and x0.at(50.0, outside="clamp")[0] == J[0]
    with pytest.raises(InputError, match="outside its grid"):
        x0.at(2.1)


def _refusal(x0, **kw) -> str:
    with pytest.raises(InputError) as e:
        x0.check_data(**kw, table="--j-star hand.parquet", data="--data d.npz")
    message = str(e.value)
    assert "\n" not in message and message.startswith("--j-star hand.parquet: ")
    return message


def test_check_data_refuses_a_table_of_other_data_by_fingerprint():
    x0 = hand_table(fingerprint="sha256:abc")
    message = _refusal(x0, fingerprint="sha256:other")
    assert "fingerprint sha256:abc" in message and "--data d.npz has sha256:other" in message
    for fp in ("sha256:abc", "", None):  # the same data; not recorded; not checked
        x0.check_data(fp, table="--j-star hand.parquet", data="--data d.npz")
    hand_table(fingerprint="").check_data("sha256:other", table="t", data="d")  # a table without one


def test_check_data_refuses_a_floor_of_the_other_latents():
    assert "latents=posterior" in _refusal(hand_table(latents="posterior"), latents="mean")
    assert "latents=mean" in _refusal(hand_table(latents="mean"), latents="posterior")
    assert "latents=mean" in _refusal(hand_table(latents=""), latents="posterior")  # other data: the means
    for table_latents, latents in (("posterior", "posterior"), ("mean", "mean"), ("", "mean"), ("mean", None)):
        hand_table(latents=table_latents).check_data(latents=latents, table="t", data="d")


def test_check_data_refuses_the_floor_of_the_other_kind_of_model_and_other_labels():
    # a model without labels cannot reach the class-conditional floor; a conditional model goes below the
    # unconditional one: both refused, one line naming the table
    assert "has no class labels and cannot reach it" in _refusal(hand_table(conditional=True), conditional=False)
    message = _refusal(hand_table(), conditional=True)
    assert message.startswith("--j-star hand.parquet: the unconditional floor, but the model is class-conditional")
    assert "--conditional" in message
    hand_table(conditional=True).check_data(conditional=True, table="t", data="d")
    hand_table().check_data(conditional=False, table="t", data="d")
    hand_table(conditional=True).check_data(table="t", data="d")  # not checked
    hand_table().check_data(table="t", data="d")
    # the labels of a class-conditional floor: the same, not recorded, not checked; other labels refused
    x0 = hand_table(conditional=True, labels="sha256:lab")
    assert x0.labels_fingerprint == "sha256:lab"
    for labels in ("sha256:lab", "", None):
        x0.check_data(conditional=True, labels=labels, table="t", data="d")
    hand_table(conditional=True).check_data(conditional=True, labels="sha256:x", table="t", data="d")
    message = _refusal(x0, conditional=True, labels="sha256:other")
    assert "labels with fingerprint sha256:lab" in message and "--data d.npz has labels sha256:other" in message


def _bad(**change) -> JStarTable:
    """The hand table's columns with some changed (x0 units)."""
    cols = {"sigma": GRID, "j_star_x0": J, "stderr_x0": STDERR, "ci_low_x0": LOW, "ci_high_x0": HIGH,
            "target": ["x0"] * 3, "estimator": ["knn"] * 3, "total_variance": [1.0] * 3}
    return JStarTable(pa.table({**cols, **change}), source="bad.parquet")


@pytest.mark.parametrize("change, words", [
    ({"ci_low_x0": [0.009, 0.102, 0.29], "ci_high_x0": [0.011, 0.098, 0.31]}, ["row 1", "ci_low_x0 = 0.102 is above"]),
    ({"j_star_x0": [0.01, math.nan, 0.3]}, ["row 1", "'j_star_x0' must be finite"]),
    ({"ci_high_x0": [0.011, 0.102, math.inf]}, ["row 2", "'ci_high_x0' must be finite"]),
    ({"j_star_x0": [0.01, 0.2, 0.3]}, ["row 1", "j_star_x0 = 0.2 lies outside its interval [0.098, 0.102]"]),
    ({"ci_low_x0": [-0.5, 0.098, 0.29]}, ["row 0", "'ci_low_x0' must be finite and >= 0"]),
    ({"stderr_x0": [1e-4, -1e-3, 3e-3]}, ["row 1", "'stderr_x0'"]),
    ({"total_variance": [math.nan] * 3}, ["row 0", "'total_variance'"]),
    ({"sigma": [0.5, math.nan, 8.0]}, ["row 1", "sigma must be finite and > 0"]),
], ids=["ci_low above ci_high", "nan j_star", "inf ci_high", "j_star outside", "negative ci_low",
        "negative stderr", "nan total variance", "nan sigma"])
def test_a_table_whose_numbers_cannot_be_trusted_is_refused_naming_the_row(change, words):
    # fit, diagnose and train took a table with ci_low > ci_high (fit: 771/1000 bootstrap replicates invalid)
    with pytest.raises(InputError) as e:
        _bad(**change).x0()
    message = str(e.value)
    assert message.startswith("J* table bad.parquet: ") and "\n" not in message
    for w in words:
        assert w in message, message


def test_a_table_without_rows_is_refused():
    # fit on a zero-row table crashed (IndexError)
    empty = {name: pa.array([], pa.float64()) for name in ("sigma", "j_star_x0", "stderr_x0", "ci_low_x0",
                                                           "ci_high_x0", "total_variance")}
    table = JStarTable(pa.table({**empty, "target": pa.array([], pa.string())}), source="empty.parquet")
    with pytest.raises(InputError, match=r"J\* table empty.parquet: has no rows"):
        table.x0()


def test_round_off_below_zero_and_at_the_interval_ends_reads_as_valid():
    x0 = _bad(j_star_x0=[-1e-19, 0.1, 0.31 + 1e-16], ci_low_x0=[0.0, 0.098, 0.29]).x0()
    assert x0.j_star[0] == 0.0
