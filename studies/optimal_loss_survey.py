"""The optimal-loss survey (the paper's Fig. 1): J*(σ) of several data sets in four prediction targets.

For the bundled data set and every `--data SRC`: one estimate of J*(σ) in the x0 target, converted to
the eps, VP v-prediction and flow-matching-velocity targets (`build_table(est, target=...)`), and σ*;
with --conditional the class-conditional floor Σ_c π_c J*_c of every (labelled) data set instead.
Each data set is a stage (`lossfloor.jobs.study`) in its own folder, keyed by the data, the σ grid and the
estimator: a rerun skips the finished ones. MLflow: one parent run `optimal-loss-survey` with one child run
per data set (`record_estimate`); the comparison figure (offline HTML) on the parent and in --out.

    python studies/optimal_loss_survey.py --smoke                       # a laptop, ~15 s
    python studies/optimal_loss_survey.py --data cifar10/ --dry-run     # what it would do
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python studies/optimal_loss_survey.py --data /shared/latents.zip --engine ray --workers 4

Outputs (--out, default runs/optimal_loss_survey):
    LABEL/jstar_TARGET.parquet      the J* table of each data set and target
    LABEL/DONE.json                 written last: the data set is finished (config.json: its key)
    optimal_loss_survey.html        the comparison figure
    summary.json                    data sets, N, estimator, σ*, MLflow run ids
    work/                           finished batches of each estimate: a killed estimate resumes from them
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # _common, also when imported by tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, default_out, ensure_lossfloor, parser, run_study

ensure_lossfloor()

from lossfloor.atomic import write_json  # noqa: E402
from lossfloor.errors import InputError  # noqa: E402
from lossfloor.jobs.engine import Engine, add_engine_args  # noqa: E402
from lossfloor.jobs.study import Done, Step, Study  # noqa: E402

log = logging.getLogger("optimal_loss_survey")

STUDY = "optimal_loss_survey"
TARGETS = ("x0", "eps", "vp-v", "fm-velocity")  # estimated in x0, converted to the others
DEFAULT_GRID = "0.002:80:32"
SMOKE = {"sigma_grid": "0.01:20:6", "queries_per_sample": 1, "max_samples": 1000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(
        prog="optimal_loss_survey",
        description="J*(sigma) of the bundled data set and of every --data, in the x0, eps, vp-v and "
        "fm-velocity targets, with sigma*; logged to MLflow (a parent run, one child per data set).",
    )
    p.add_argument("--data", action="append", default=[], metavar="SRC",
                   help="a data set besides the bundled one (repeatable); any source `lossfloor estimate` reads")
    p.add_argument("--estimator", default="auto",
                   help="auto | exact | knn | snis | dol | cdol (auto: exact up to 10 000 samples on a CPU, 50 000 on CUDA, else knn)")
    p.add_argument("--subset-size", type=int, default=None, metavar="L",
                   help="reference subset size of snis/dol/cdol (default min(4096, N))")
    p.add_argument("--sigma-grid", default=None, metavar="MIN:MAX:COUNT",
                   help=f"log-spaced sigma grid (default {DEFAULT_GRID}; {SMOKE['sigma_grid']} with --smoke)")
    p.add_argument("--queries-per-sample", type=int, default=None, metavar="K",
                   help=f"noisy queries per sample, M = K N (default 3; {SMOKE['queries_per_sample']} with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conditional", action="store_true",
                   help="the class-conditional floor sum_c pi_c J*_c of every data set (all must be labelled)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (local engine; the ray engine uses --gpus-per-worker)")
    add_engine_args(p, ray="the batches on a Ray Data actor pool", workers_help="actors in the pool",
                    worker="actor", gpus_help="> 0 runs the kernel on CUDA", address_env="RAY_ADDRESS")
    p.add_argument("--max-device-gb", type=float, default=None, metavar="GB",
                   help="cap on one J* actor's device memory: the batch is sized to it, and on CUDA the data stay in host "
                   "memory (each batch gathering its rows) unless they fit next to a batch (default: no cap)")
    p.add_argument("--smoke", action="store_true",
                   help=f"fast check: grid {SMOKE['sigma_grid']}, K={SMOKE['queries_per_sample']}, "
                   f"at most {SMOKE['max_samples']} samples per data set")
    p.add_argument("--dry-run", action="store_true", help="print what would be done and exit")
    add_output_args(p, STUDY, experiment="optimal-loss")
    args = p.parse_args(argv)
    args.sigma_grid = args.sigma_grid or (SMOKE["sigma_grid"] if args.smoke else DEFAULT_GRID)
    if args.queries_per_sample is None:
        args.queries_per_sample = SMOKE["queries_per_sample"] if args.smoke else 3
    args.max_samples = SMOKE["max_samples"] if args.smoke else None
    args.out = args.out or default_out(STUDY)
    return args


@dataclass(frozen=True)
class DataPlan:
    source: str
    label: str  # names the child run and the output folder
    n_samples: int  # the samples used (after the --smoke cap)
    sample_shape: tuple[int, ...]
    estimator: str
    subset_size: int
    c: float


def _label(source: str, taken: set[str]) -> str:
    text = source.split(":", 1)[1] if source.startswith("bundled:") else Path(source.rstrip("/\\")).name
    text = re.sub(r"\.(npy|npz|zip)(?=$|:)", "", text, flags=re.IGNORECASE)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "data"
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def make_plan(args: argparse.Namespace) -> list[DataPlan]:
    """The data sets (bundled first, duplicates dropped), their sizes and resolved estimators."""
    from lossfloor.data import DEFAULT_SOURCE, describe
    from lossfloor.floor import ESTIMATORS

    if args.estimator not in ESTIMATORS:
        raise InputError(f"--estimator: expected one of {', '.join(ESTIMATORS)}, got {args.estimator!r}")
    sources = list(dict.fromkeys([DEFAULT_SOURCE, *args.data]))
    plan, taken = [], set()
    for src in sources:
        count, shape = describe(src)
        n = count if args.max_samples is None else min(count, args.max_samples)
        cfg = estimator_config(args, args.estimator).resolve(n, math.prod(shape))  # auto: exact or knn by N
        plan.append(DataPlan(src, _label(src, taken), n, tuple(shape), cfg.estimator, cfg.subset_size, cfg.c))
    return plan


def estimator_config(args: argparse.Namespace, estimator: str):
    from lossfloor.floor import EstimatorConfig

    return EstimatorConfig(
        estimator=estimator,
        subset_size=args.subset_size if estimator not in ("exact", "auto") else None,
        queries_per_sample=args.queries_per_sample,
        seed=args.seed,
        device=args.device if args.engine.kind == "local" else args.engine.device,
        max_device_gb=args.max_device_gb,
    )


def describe_plan(args: argparse.Namespace, plan: list[DataPlan], sigmas, uri: str) -> str:
    lines = ["optimal-loss survey: dry run (nothing is computed or written)", "data sets:"]
    for d in plan:
        how = "L=N" if d.estimator == "exact" else f"L={d.subset_size}, C={d.c:.4g}"
        lines.append(f"  {d.label:<16} {d.source}  N={d.n_samples}  shape={d.sample_shape}  "
                     f"estimator={d.estimator} ({how}), M={args.queries_per_sample * d.n_samples} queries")
    lines += [
        f"sigma grid: {args.sigma_grid} ({len(sigmas)} log-spaced sigmas, {sigmas[0]:.4g} to {sigmas[-1]:.4g})",
        f"queries per sample: {args.queries_per_sample}; seed {args.seed}; engine {args.engine.kind}"
        + (f" ({args.engine.workers} worker(s), {args.engine.gpus_per_worker:g} GPU each)"
           if args.engine.kind == "ray" else f" (device {args.device})"),
        f"targets: x0 (estimated), {', '.join(TARGETS[1:])} (converted); sigma* per data set"
        + ("; the class-conditional floor, each class's J*_c over its own samples (estimator resolved per class)"
           if args.conditional else ""),
        f"outputs: {args.out}/LABEL/jstar_TARGET.parquet, {args.out}/{STUDY}.html, {args.out}/summary.json, "
        f"{args.out}/work/",
        f"MLflow: {uri}, experiment {args.experiment!r}: parent run 'optimal-loss-survey', "
        f"one child run per data set ({', '.join(d.label for d in plan)})",
    ]
    return "\n".join(lines)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag a stage would refuse, refused before the first one."""
    from lossfloor.devices import check_device

    for flag, value, low in (("--queries-per-sample", args.queries_per_sample, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise InputError(f"{flag}: expected an integer >= {low}, got {value}")
    if args.engine.kind == "local":
        check_device(args.device)
    else:
        from lossfloor.data.node_cache import check_cache_root

        check_cache_root()  # the Ray actors' data cache on this machine
    estimator_config(args, "auto")  # its own checks (--max-device-gb)


def estimate_step(args: argparse.Namespace, d: DataPlan, ds, sigmas, study: Study) -> Step:
    """A data set's stage in OUT/LABEL/, keyed by the data, the σ grid and the estimator; later stages get
    its J* tables by target."""
    from lossfloor.data import labels_fingerprint
    from lossfloor.jobs.estimate import stage_key

    key = {"data_fingerprint": ds.fingerprint, "n_samples": len(ds), "sigmas": [float(s) for s in sigmas],
           "estimator": stage_key(estimator_config(args, d.estimator), conditional=args.conditional),
           "targets": list(TARGETS)}
    if args.conditional:
        key["labels_fingerprint"] = labels_fingerprint(ds.labels)
    return Step(name=f"estimate-{d.label}", folder=d.label, key=key,
                doing=f"{d.estimator} estimator on {args.engine.kind} engine",
                work=functools.partial(estimate_into, args, d, ds, sigmas), read=read_tables,
                log=functools.partial(log_data_set, args, d, ds, study))


def estimate_into(args: argparse.Namespace, d: DataPlan, ds, sigmas, folder: Path) -> dict:
    """J*(σ) in x0 units with the chosen engine (resumable from OUT/work), written in every target:
    FOLDER/jstar_TARGET.parquet."""
    from lossfloor.floor import build_table, write_table
    from lossfloor.jobs import estimate

    est = estimate.estimate(ds.samples, sigmas, estimator_config(args, d.estimator), engine=args.engine,
                            labels=ds.labels if args.conditional else None, fingerprint=ds.fingerprint,
                            work_parent=args.out / "work")
    for t in TARGETS:
        write_table(build_table(est, target=t, fingerprint=ds.fingerprint), folder / f"jstar_{t}.parquet")
    return {"tables": {t: f"jstar_{t}.parquet" for t in TARGETS}, "total_variance": est.total_variance}


def read_tables(stage) -> dict:
    from lossfloor.floor import read_table

    return {t: read_table(stage.dir / f"jstar_{t}.parquet") for t in TARGETS}


def log_data_set(args: argparse.Namespace, d: DataPlan, ds, study: Study, done: Done) -> str:
    """The data set's child run: the x0 table with the other targets (`record_estimate`)."""
    from lossfloor.jobs.record import record_estimate

    by_target = done.value
    return record_estimate(by_target["x0"], also=[by_target[t] for t in TARGETS[1:]],
                           params={"data": d.source, "n_samples": len(ds), "sample_shape": list(ds.sample_shape),
                                   "engine": args.engine.kind, "study": STUDY},
                           **study.child(d.label, study.stage_tags(done)))


def run(args: argparse.Namespace) -> int:
    import lossfloor
    from lossfloor.diffusion import parse_sigma_grid
    from lossfloor.jobs.study import check_outputs, tracking_uri

    log.info("lossfloor %s from %s", lossfloor.__version__, Path(lossfloor.__file__).parent)
    args.engine = Engine.from_args(args)  # the engine flags as one checked setting
    sigmas = parse_sigma_grid(args.sigma_grid, flag="--sigma-grid")
    check_flags(args)
    plan = make_plan(args)
    if args.dry_run:
        print(describe_plan(args, plan, sigmas, tracking_uri(args.tracking_uri)))
        return 0
    uri = check_outputs(args.out, args.tracking_uri)  # before the first stage: --out writable, the store opens

    from lossfloor.data import load, load_for
    from lossfloor.jobs.record import jstar_page
    from lossfloor.jobs.study import open_study
    from lossfloor.jobs.tracking import ui_hint

    # every data set read and checked (shape, finite values) before the first stage; Ray: shard folders stay put
    if args.conditional:  # the classes are read on this process
        datasets = [load(d.source, max_samples=args.max_samples) for d in plan]
        for d, ds in zip(plan, datasets):
            if ds.labels is None:
                raise InputError(f"--conditional: --data {d.source} has no class labels (the class-conditional floor "
                                 "needs labelled data)")
    else:
        datasets = [load_for(d.source, args.engine.kind, max_samples=args.max_samples) for d in plan]
    args.out.mkdir(parents=True, exist_ok=True)
    tables, summary = {}, []
    study_tags = {"lossfloor.kind": "study", "lossfloor.study": STUDY}
    params = {
        "data": [d.source for d in plan], "estimator": args.estimator, "sigma_grid": args.sigma_grid,
        "queries_per_sample": args.queries_per_sample, "seed": args.seed, "engine": args.engine.kind,
        "targets": list(TARGETS), "smoke": args.smoke, "out": str(args.out), "conditional": args.conditional,
    }
    with open_study(name=STUDY, out=args.out, log=log, experiment=args.experiment, run_name="optimal-loss-survey",
                    tags=study_tags, params=params, tracking_uri=uri) as study:
        parent = study.parent
        for d, ds in zip(plan, datasets):
            log.info("%s: %d samples of shape %s, %s estimator", d.label, len(ds), ds.sample_shape, d.estimator)
            done = study.run(estimate_step(args, d, ds, sigmas, study))
            by_target = done.value
            s_star = by_target["x0"].sigma_star
            if s_star is not None:
                parent.log_metrics({f"sigma_star.{d.label}": s_star})
            tables[d.label] = by_target
            summary.append({**asdict(d), "sigma_star": s_star, "run_id": done.logged,
                            "tables": {t: str(done.stage.dir / f"jstar_{t}.parquet") for t in TARGETS}})
        html = jstar_page(tables, targets=TARGETS, title="Optimal loss J*(σ) per target (Xu et al., Fig. 1)",
                          out=args.out / f"{STUDY}.html")
        parent.log_artifact(html)
        meta = {"tracking_uri": uri, "experiment": args.experiment, "parent_run_id": parent.run_id,
                "sigma_grid": args.sigma_grid, "targets": list(TARGETS), "data_sets": summary}
        parent.log_artifact(write_json(args.out / "summary.json", meta))

    for s in summary:
        star = "undefined" if s["sigma_star"] is None else f"{s['sigma_star']:.4g}"
        print(f"{s['label']:<16} N={s['n_samples']:<8} {s['estimator']:<6} sigma*={star:<10} run {s['run_id']}")
    print(f"figure: {html}\nMLflow: {uri} experiment {args.experiment!r} parent run {parent.run_id}\n"
          f"open the runs: {ui_hint(uri, parent.experiment_id)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_study("optimal_loss_survey", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
