"""studies/paper_claims.py: a tiny in-process run (stages, rerun, MLflow, page = table), and its flags."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lossfloor.pages.html import is_offline_html
from lossfloor.tracking import PARENT_RUN_TAG, client

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "studies" / "paper_claims.py"


def _study():
    spec = importlib.util.spec_from_file_location("paper_claims", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(monkeypatch):
    """The study with a preset small enough for the fast tier."""
    study = _study()
    smoke = dict(study.PRESETS["smoke"])
    smoke["survey"] = dict(smoke["survey"], max_samples=60, sigma_grid="0.05:5:4")
    monkeypatch.setitem(study.PRESETS, "smoke", smoke)
    return study


def test_survey_part_runs_resumes_and_logs(tmp_path, tiny, capsys):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--smoke", "--parts", "survey", "--out", str(out), "--tracking-uri", uri]
    assert tiny.main(argv) == 0
    result = json.loads((out / "survey" / "result.json").read_text())
    assert [r["data"] for r in result["rows"]] == ["digits", "photos", "terrain"]
    assert [r["dim"] for r in result["rows"]] == [64, 3072, 256] and all(r["n"] == 60 for r in result["rows"])
    page = (out / "paper_claims.html").read_text()
    md = (out / "paper-claims.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert is_offline_html(page)
    (claim,) = summary["claims"]
    assert claim["verdict"] in ("reproduced", "not reproduced", "inconclusive at this scale")
    assert claim["measured"] in md  # the table and the page say the same numbers
    import html
    assert html.escape(claim["measured"]) in page
    for r in result["rows"]:
        assert f"{r['data']} {r['plateau_per_value']:.3g}" in claim["measured"]
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("paper-claims").experiment_id])
    parents = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_RUN_TAG in r.data.tags]
    assert len(parents) == 1 and [c.data.tags["lossfloor.claim"] for c in children] == ["sigma-star-plateau"]
    assert children[0].data.tags["lossfloor.verdict"] == claim["verdict"]
    mtime = (out / "survey" / "result.json").stat().st_mtime_ns
    assert tiny.main(argv) == 0  # a rerun skips the finished part and adds no runs
    assert (out / "survey" / "result.json").stat().st_mtime_ns == mtime
    assert len(client(uri).search_runs([parents[0].info.experiment_id])) == len(runs)


@pytest.mark.parametrize("parts", ["bogus", "", "survey,nope"])
def test_unknown_parts_are_refused(tmp_path, parts, capsys):
    study = _study()
    assert study.main(["--parts", parts, "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parts" in err[0]
    assert not (tmp_path / "o").exists()


def test_dry_run_names_every_part(tmp_path, capsys):
    assert _study().main(["--smoke", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "estimators" in text and "survey" in text and not (tmp_path / "o").exists()


@pytest.mark.e2e  # every part of the smoke preset, as the README runs it: a few minutes on 2 cores
def test_smoke_preset_runs_every_part(tmp_path):
    import subprocess

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run([sys.executable, str(STUDY), "--smoke", "--out", str(out), "--tracking-uri", uri],
                         capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    ids = [c["id"] for c in summary["claims"]]
    assert ids == ["cdol-c", "queries-convergence", "sigma-star-plateau", "eps-high-sigma", "intermediate-peak",
                   "schedule", "scaling"]
    md = (out / "paper-claims.md").read_text()
    page = (out / "paper_claims.html").read_text()
    import html
    for c in summary["claims"]:
        assert c["verdict"] in ("reproduced", "not reproduced", "inconclusive at this scale")
        assert c["measured"].replace("|", "\\|") in md and html.escape(c["measured"]) in page
    assert is_offline_html(page) and page.count("Plotly.newPlot") >= 6
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("paper-claims").experiment_id])
    assert sorted(r.data.tags.get("lossfloor.claim", "") for r in runs if PARENT_RUN_TAG in r.data.tags) == sorted(ids)
