"""The paper's claims, side by side: one study that tests each of them on data anyone can run.

Each part is a stage (`lossfloor.jobs.study`): a rerun skips the finished ones. Every number comes with
seeds and a 95 % interval, and every claim gets a verdict (reproduced, not reproduced, inconclusive or
not testable at this scale) computed from those intervals (`lossfloor.claims`).

    estimators  cDOL's error against C (1 = DOL … 4N/L … ∞ = SNIS) and against the number of queries,
                and the knn estimator's, against the exact estimator on the same queries (Fig. 1c, 4, 5)
    survey      σ* and the plateau J*(∞) of three real data sets of different kinds: the digits, patches of
                photographs, patches of an elevation model (Fig. 1d)
    diagnosis   EDM, flow-matching, NCSN, DDPM-ε and VP-v models trained at equal images, diagnosed against
                the same J* (Fig. 2): ε-prediction errs most at high σ; every gap peaks at intermediate σ
    schedule    the optimal-loss schedule against EDM2's and flow matching's at equal images, seeds 0..S-1,
                on the weighted loss gap and FD (§4)
    scaling     the scaling study's ladder: raw vs gap-corrected vs free-offset power laws, |ρ| and hold-out,
                bootstrap intervals over models (§5)

    python studies/paper_claims.py --smoke          # every part in a few minutes on a laptop
    python studies/paper_claims.py                  # the full preset (its time: README)
    python studies/paper_claims.py --parts survey --dry-run

Outputs (--out, default runs/paper_claims): PART/result.json (+ DONE.json) per part, paper_claims.html
(the verdict table and a figure per claim), paper-claims.md (the same numbers as a table: the committed
docs/paper-claims.md is this file of the full run), summary.json. MLflow: a parent run `paper-claims`
with the page, one child run per claim (its verdict, intervals and result.json).
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # _common, also when imported by tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, default_out, ensure_lossfloor, parser, run_study

ensure_lossfloor()

from lossfloor.atomic import write_json, write_output  # noqa: E402
from lossfloor.errors import InputError  # noqa: E402
from lossfloor.jobs.study import Done, Step, Study  # noqa: E402

log = logging.getLogger("paper_claims")

STUDY = "paper_claims"
PARTS = ("estimators", "survey", "diagnosis", "schedule", "scaling")
PROCESSES = ("edm", "fm", "ncsn", "ddpm-eps", "vp-v")  # `lossfloor train --process`, each with its own schedule
SURVEY_DATA = ("bundled:digits", "bundled:photos", "bundled:terrain")

# What each part computes, per preset. estimators: L kernels per query, the σ grid, seeds, the queries M
# of the convergence sweep (fractions of N; the C sweep runs at the largest). survey: exact J* per data set.
PRESETS = {
    "full": {
        "estimators": {"data": "bundled:digits", "max_samples": None, "sigma_grid": "0.02:20:8", "subset_size": 128,
                       "seeds": 5, "queries": (0.25, 0.5, 1.0, 3.0)},
        "survey": {"data": SURVEY_DATA, "max_samples": None, "sigma_grid": "0.002:80:32", "queries_per_sample": 3},
        "diagnosis": {"data": "bundled:digits", "jstar_grid": "0.002:80:32", "preset": "tiny", "images": 16384,
                      "batch": 128, "warmup": 2048, "evals": 4, "sigmas": "0.005:40:12", "n_samples": 1797, "seed": 0},
        "schedule": {"data": "bundled:digits", "jstar_grid": "0.002:80:32", "preset": "tiny", "images": 16384,
                     "batch": 128, "warmup": 2048, "evals": 8, "seeds": 3, "features": "pixels", "fd_samples": 1024},
        "scaling": {"smoke_budget": "normal", "budget_scale": 1.0, "bootstrap": 1000},
    },
    "smoke": {
        "estimators": {"data": "bundled:digits", "max_samples": 400, "sigma_grid": "0.05:5:4", "subset_size": 32,
                       "seeds": 3, "queries": (0.5, 2.0)},
        "survey": {"data": SURVEY_DATA, "max_samples": 300, "sigma_grid": "0.01:20:8", "queries_per_sample": 1},
        "diagnosis": {"data": "bundled:digits", "jstar_grid": "0.002:80:12", "preset": "tiny", "images": 1024,
                      "batch": 64, "warmup": 256, "evals": 2, "sigmas": "0.02:20:5", "n_samples": 128, "seed": 0},
        "schedule": {"data": "bundled:digits", "jstar_grid": "0.002:80:12", "preset": "tiny", "images": 1024,
                     "batch": 64, "warmup": 256, "evals": 2, "seeds": 2, "features": "pixels", "fd_samples": 128},
        "scaling": {"smoke_budget": "tiny", "budget_scale": 1.0, "bootstrap": 20},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(prog=STUDY, description="Tests the paper's claims (estimators, survey, diagnosis, schedule, scaling) "
               "on data that ships with "
               "lossfloor, with seeds, intervals and a verdict per claim; writes a page and paper-claims.md.")
    p.add_argument("--smoke", action="store_true", help="every part in a few minutes (small data, few seeds)")
    p.add_argument("--parts", default=",".join(PARTS), metavar="LIST",
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dry-run", action="store_true", help="print what would be done and exit")
    add_output_args(p, STUDY, experiment="paper-claims")
    args = p.parse_args(argv)
    args.preset = "smoke" if args.smoke else "full"
    args.out = args.out or default_out(STUDY)
    return args


def check_flags(args: argparse.Namespace) -> list[str]:
    """The parts asked for (refusing unknown ones) and the device, before any work."""
    from lossfloor.devices import check_device

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise InputError(f"--parts: expected a comma-separated list of {', '.join(PARTS)}, got {args.parts!r}")
    check_device(args.device)
    return [p for p in PARTS if p in parts]


# ---------------------------------------------------------------------------------------------------
# Parts: each a stage whose work writes result.json and whose claims are read back from it


def _load(source: str, max_samples: int | None):
    from lossfloor.data import load

    return load(source, max_samples=max_samples)


def estimators_work(args: argparse.Namespace, folder: Path) -> dict:
    """The C sweep at the largest M, and the convergence sweep over M at the paper's C and for knn."""
    from lossfloor.claims import estimators
    from lossfloor.diffusion import parse_sigma_grid

    cfg = PRESETS[args.preset]["estimators"]
    ds = _load(cfg["data"], cfg["max_samples"])
    n, sigmas = len(ds), parse_sigma_grid(cfg["sigma_grid"])
    seeds = list(range(cfg["seeds"]))
    ms = sorted({max(2, round(f * n)) for f in cfg["queries"]})
    say = functools.partial(log.info, "estimators: %s")
    c_sweep = estimators.sweep(ds.samples, sigmas, subset_size=cfg["subset_size"], seeds=seeds, queries=[ms[-1]],
                               device=args.device, progress=say)
    grid = estimators.c_grid(n, cfg["subset_size"])
    q_sweep = estimators.sweep(ds.samples, sigmas, subset_size=cfg["subset_size"], seeds=seeds, queries=ms,
                               cs={estimators.PAPER_C: grid[estimators.PAPER_C]}, device=args.device, progress=say)
    write_json(folder / "result.json", {"c_sweep": c_sweep, "queries_sweep": q_sweep, "data": cfg["data"],
                                        "fingerprint": ds.fingerprint})
    return {"data": cfg["data"], "n": n, "seeds": len(seeds), "queries": ms}


def estimators_claims(result: dict) -> list[dict]:
    from lossfloor.claims import estimators

    return estimators.describe(result["c_sweep"], result["queries_sweep"], result["data"])


def survey_work(args: argparse.Namespace, folder: Path) -> dict:
    """Exact J* of each data set on one σ grid, with σ* and the plateau."""
    from lossfloor.claims import survey
    from lossfloor.diffusion import parse_sigma_grid
    from lossfloor.floor import EstimatorConfig, estimate

    cfg = PRESETS[args.preset]["survey"]
    sigmas = parse_sigma_grid(cfg["sigma_grid"])
    rows = []
    for source in cfg["data"]:
        ds = _load(source, cfg["max_samples"])
        log.info("survey: %s, %d samples of shape %s", source, len(ds), ds.sample_shape)
        est = estimate(ds.samples, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=cfg["queries_per_sample"],
                                                          device=args.device), progress=False)
        rows.append(survey.survey_row(source.removeprefix("bundled:"), est, n=len(ds), dim=ds.samples[0].size))
    write_json(folder / "result.json", {"rows": rows, "sigma_grid": cfg["sigma_grid"]})
    return {"data": list(cfg["data"]), "sigma_grid": cfg["sigma_grid"]}


def survey_claims(result: dict) -> list[dict]:
    from lossfloor.claims import survey

    return survey.describe(result["rows"], result["sigma_grid"])


def jstar_table(args: argparse.Namespace, ds, grid: str, path: Path) -> Path:
    """The exact J* table of the data set on `grid` at `path` (kept: a rerun of the stage reads it)."""
    from lossfloor.diffusion import parse_sigma_grid
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table

    if not path.is_file():
        est = estimate(ds.samples, parse_sigma_grid(grid), EstimatorConfig(estimator="exact", device=args.device),
                       progress=False)
        write_table(build_table(est, target="x0", fingerprint=ds.fingerprint), path)
    return path


def train_config(cfg: dict, *, process: str, schedule, jstar: Path, seed: int, run: str):
    """A run of the part's budget: `preset` unconditional, `images` at `batch`, `evals` evaluations."""
    from lossfloor.train import TrainConfig

    return TrainConfig(preset=cfg["preset"], process=process, schedule=schedule, jstar=str(jstar), conditional=False,
                       batch_n_img=cfg["batch"], duration_n_img=cfg["images"], warmup_n_img=cfg["warmup"],
                       eval_every_n_img=cfg["images"] // cfg["evals"], seed=seed, run=run)


def diagnosis_work(args: argparse.Namespace, folder: Path) -> dict:
    """One model per parametrisation at equal images (each with its own σ distribution and weighting),
    each diagnosed against the same J* on the same samples, noise and σ grid."""
    from lossfloor.claims.diagnosis import gaps_of
    from lossfloor.diffusion import parse_sigma_grid
    from lossfloor.jobs.diagnose import DiagnoseSpec, diagnose
    from lossfloor.jobs.train import train_run

    cfg = PRESETS[args.preset]["diagnosis"]
    ds = _load(cfg["data"], None)
    jstar = jstar_table(args, ds, cfg["jstar_grid"], folder / "jstar.parquet")
    gaps = {}
    for process in PROCESSES:
        run_dir = folder / "runs" / process
        log.info("diagnosis: training %s (%d images)", process, cfg["images"])
        train_run(train_config(cfg, process=process, schedule=None, jstar=jstar, seed=cfg["seed"], run=process),
                  data=cfg["data"], out=run_dir, device=args.device, samples=0)
        d = diagnose(DiagnoseSpec(model=str(run_dir), data=cfg["data"], sigmas=parse_sigma_grid(cfg["sigmas"]),
                                  out=str(folder / f"diagnosis-{process}.parquet"), j_star=str(jstar), seed=cfg["seed"],
                                  n_samples=min(cfg["n_samples"], len(ds)), device=args.device))
        gaps[process] = gaps_of(d.table)
    write_json(folder / "result.json", {"gaps": gaps, "data": cfg["data"], "settings": cfg})
    return {"data": cfg["data"], "processes": list(PROCESSES)}


def diagnosis_claims(result: dict) -> list[dict]:
    from lossfloor.claims import diagnosis

    s = result["settings"]
    data = (f"{result['data']}: one unconditional {s['preset']} model per parametrisation ({', '.join(result['gaps'])}; "
            f"each with its own σ distribution and weighting and its published noise input), {s['images']} training "
            f"images each (batch {s['batch']}), seed {s['seed']}; diagnosed on {s['n_samples']} samples at σ grid "
            f"{s['sigmas']}")
    return diagnosis.describe(result["gaps"], data)


def schedule_work(args: argparse.Namespace, folder: Path) -> dict:
    """J* of the data, then one run per (schedule, seed) at equal images, each measured at its end on the
    weighted gap (one fixed weighting) and FD (samples of its last checkpoint, sampler seed = run seed)."""
    from lossfloor.claims.schedule import KIND, SCHEDULES
    from lossfloor.jobs.train import train_run
    from lossfloor.train.objectives import FDObjective, GapObjective, gap_key
    from lossfloor.train.run_folder import read_run_folder
    from lossfloor.train.schedules import SCHEDULES as SCHEDULE_KINDS
    from lossfloor.train.schedules import JStarCurve

    cfg = PRESETS[args.preset]["schedule"]
    ds = _load(cfg["data"], None)
    jstar = jstar_table(args, ds, cfg["jstar_grid"], folder / "jstar.parquet")
    values = {s: {"gap": [], "fd": []} for s in SCHEDULES}
    for schedule in SCHEDULES:
        for seed in range(cfg["seeds"]):
            config = train_config(cfg, process="fm" if schedule == "fm" else "edm", jstar=jstar, seed=seed,
                                  schedule=SCHEDULE_KINDS[KIND[schedule]](), run=f"{schedule}-seed{seed}")
            log.info("schedule: training %s, seed %d, %d images", schedule, seed, cfg["images"])
            run_dir = folder / "runs" / f"{schedule}-seed{seed}"
            train_run(config, data=cfg["data"], out=run_dir, device=args.device, samples=0)
            rf = read_run_folder(run_dir)
            _, rows, _ = rf.last_eval()
            metrics = {gap_key(r["sigma"]): r["gap"] for r in rows}
            values[schedule]["gap"].append(GapObjective(JStarCurve.from_path(jstar), [r["sigma"] for r in rows])(metrics))
            fd = FDObjective(ds, features=cfg["features"], n=cfg["fd_samples"], seed=seed, device=args.device)
            values[schedule]["fd"].append(fd(metrics, rf.checkpoints[-1]))
    write_json(folder / "result.json", {"values": values, "data": cfg["data"], "settings": cfg})
    return {"data": cfg["data"], "seeds": cfg["seeds"]}


def schedule_claims(result: dict) -> list[dict]:
    from lossfloor.claims import schedule

    s = result["settings"]
    data = (f"{result['data']}, unconditional preset {s['preset']}, {s['images']} training images per run (batch {s['batch']}), "
            f"seeds 0-{s['seeds'] - 1} per schedule; FD of {s['fd_samples']} samples in {s['features']} features")
    return schedule.describe(result["values"], data)


def scaling_work(args: argparse.Namespace, folder: Path) -> dict:
    """The scaling study on the bundled digits (its own stages, resumable, its own MLflow parent run in the
    experiment `scaling`), then its fits.json."""
    import json

    import scaling_imagenet512

    cfg = PRESETS[args.preset]["scaling"]
    argv = ["--preset", "smoke", "--smoke-budget", cfg["smoke_budget"], "--budget-scale", str(cfg["budget_scale"]),
            "--bootstrap", str(cfg["bootstrap"]), "--out", str(folder / "study"), "--tracking-uri", args.uri]
    log.info("scaling: python studies/scaling_imagenet512.py %s", " ".join(argv))
    if scaling_imagenet512.main(argv) != 0:
        raise RuntimeError(f"scaling: the scaling study failed (its log above; rerun resumes in {folder / 'study'})")
    summary = json.loads((folder / "study" / "summary.json").read_text(encoding="utf-8"))
    (fits_file,) = sorted((folder / "study").glob("fit-*/fits.json"))
    fits = json.loads(fits_file.read_text(encoding="utf-8"))
    write_json(folder / "result.json", {"fits": fits, "settings": cfg, "study_run": summary["parent_run_id"]})
    return {"quantities": list(fits), "study_run": summary["parent_run_id"]}


def scaling_claims(result: dict) -> list[dict]:
    from lossfloor.claims import scaling

    s = result["settings"]
    models = ", ".join(next(iter(result["fits"].values()))["models"])
    data = (f"the scaling study's smoke ladder on bundled:digits ({s['smoke_budget']} budget × {s['budget_scale']:g}: "
            f"models {models}), EDM2 schedule, {s['bootstrap']} bootstrap replicates over models; its MLflow parent "
            f"run {result['study_run']} (experiment scaling)")
    return scaling.describe(result["fits"], data)


WORK = {"estimators": estimators_work, "survey": survey_work, "diagnosis": diagnosis_work, "schedule": schedule_work,
        "scaling": scaling_work}
CLAIMS = {"estimators": estimators_claims, "survey": survey_claims, "diagnosis": diagnosis_claims,
          "schedule": schedule_claims, "scaling": scaling_claims}


def run_part(args: argparse.Namespace, part: str, folder: Path) -> dict:
    """The part's work; its DONE.json records the code it ran (a rerun reuses finished parts)."""
    return {**WORK[part](args, folder), "commit": args.commit}


def read_part(part: str, stage) -> dict:
    import json

    result = json.loads((stage.dir / "result.json").read_text(encoding="utf-8"))
    return {"result": result, "claims": CLAIMS[part](result), "commit": stage.result().get("commit", "unknown")}


def code_commit() -> str:
    """The checkout's git commit (with "+changes" when files differ from it), "unknown" outside a checkout."""
    import subprocess

    from _common import REPO_ROOT

    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def log_part(args: argparse.Namespace, part: str, study: Study, done: Done) -> list[str]:
    """One child run per claim of the part."""
    from lossfloor.jobs.record import record_claim

    return [record_claim(claim, [done.stage.dir / "result.json"],
                         params={"part": part, "preset": args.preset, "data": claim["data"]},
                         **study.child(claim["id"], study.stage_tags(done)))
            for claim in done.value["claims"]]


def part_step(args: argparse.Namespace, part: str, study: Study) -> Step:
    import lossfloor

    return Step(name=part, folder=part, key={"part": part, "preset": PRESETS[args.preset][part],
                                              "device": args.device, "lossfloor": lossfloor.__version__},
                doing=f"the {part} claims ({args.preset} preset)", work=functools.partial(run_part, args, part),
                read=functools.partial(read_part, part), log=functools.partial(log_part, args, part, study))


# ---------------------------------------------------------------------------------------------------


def describe_plan(args: argparse.Namespace, parts: list[str], uri: str) -> str:
    lines = [f"paper claims: dry run, {args.preset} preset (nothing is computed or written)"]
    for part in parts:
        lines.append(f"  {part:<11} {PRESETS[args.preset][part]}")
    lines += [f"outputs: {args.out}/PART/result.json, {args.out}/{STUDY}.html, {args.out}/paper-claims.md",
              f"MLflow: {uri}, experiment {args.experiment!r}: parent run 'paper-claims', one child run per claim"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lossfloor.jobs.study import check_outputs, open_study, tracking_uri

    parts = check_flags(args)
    if args.dry_run:
        print(describe_plan(args, parts, tracking_uri(args.tracking_uri)))
        return 0
    uri = args.uri = check_outputs(args.out, args.tracking_uri)
    args.commit = code_commit()
    from lossfloor.claims.report import markdown
    from lossfloor.jobs.record import claims_page
    from lossfloor.jobs.tracking import ui_hint

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    params = {"preset": args.preset, "parts": parts, "device": args.device, "out": str(args.out)}
    with open_study(name=STUDY, out=args.out, log=log, experiment=args.experiment, run_name="paper-claims",
                    tags={"lossfloor.kind": "study", "lossfloor.study": STUDY}, params=params,
                    tracking_uri=uri) as study:
        done = {part: study.run(part_step(args, part, study)) for part in parts}
        results = {part: d.value for part, d in done.items()}
        command = "python studies/paper_claims.py" + (" --smoke" if args.smoke else "") + (
            f" --parts {','.join(parts)}" if parts != list(PARTS) else "")
        ran = {"preset": args.preset, "device": args.device, "machine": f"{platform.machine()}, "
               f"{_cores()} CPU cores", "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "time of this run (parts run now, not read back)": f"{time.monotonic() - t0:.0f} s",
               "code of each part (git commit)": ", ".join(f"{p} {r['commit']}" for p, r in results.items())}
        page = claims_page(results, title="The paper's claims, side by side", about=ran, out=args.out / f"{STUDY}.html")
        md = args.out / "paper-claims.md"
        write_output(md, markdown(results, command=command, run=ran))
        study.parent.log_artifact(page)
        study.parent.log_artifact(md)
        claims = [c for r in results.values() for c in r["claims"]]
        summary = {"claims": [{k: c[k] for k in ("id", "claim", "verdict", "measured")} for c in claims],
                   "run": ran, "parent_run_id": study.parent.run_id, "tracking_uri": uri}
        study.parent.log_artifact(write_json(args.out / "summary.json", summary))
    for c in claims:
        print(f"{c['claim']:<48} {c['verdict']}")
    print(f"page: {page}\ntable: {md}\nopen the runs: {ui_hint(uri, study.parent.experiment_id)}")
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    return run_study(STUDY, parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
