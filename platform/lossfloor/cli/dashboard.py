"""`lossfloor dashboard`: a scaling study's page (standalone HTML, opens offline) rebuilt from MLflow alone.

    lossfloor dashboard (--experiment NAME | --run ID) --out FILE.html [--tracking-uri URI]
                        [--title TEXT] [--sigma S ...] [--no-log]

An experiment of `lossfloor diagnose --mlflow` runs (`--experiment diagnose`) gets a page of every
diagnosed model instead (`lossfloor.jobs.dashboard.diagnose_dashboard`).

Reads the study's parent run and its children (tags and artifacts: `lossfloor.tracking.artifacts`),
writes FILE.html atomically and logs it to the parent run as `dashboard.html` (unless --no-log)
(`lossfloor.jobs.dashboard`; the page is `lossfloor.pages.scaling`'s, so an installed wheel runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lossfloor.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard",
        help="rebuild a scaling study's offline HTML dashboard from its MLflow runs",
        description=__doc__.splitlines()[0],
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", metavar="NAME",
                       help="the latest study (top-level run with lossfloor.stage children) of this experiment")
    which.add_argument("--run", metavar="ID", help="the study's parent run (a child's id also works)")
    p.add_argument("--out", required=True, type=Path, help="output HTML file (written atomically)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.add_argument("--title", default=None, help="page title (default: 'Scaling study: RUN NAME')")
    p.add_argument("--sigma", type=float, action="append", default=None, metavar="S",
                   help="a σ panel of the loss-vs-compute figure (repeatable; default: the fitted σ)")
    p.add_argument("--no-log", action="store_true", help="do not log dashboard.html to the parent run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {args.out}: expected an .html file")
    from lossfloor.jobs.dashboard import dashboard, diagnose_dashboard, is_diagnose_experiment

    if args.experiment is not None and is_diagnose_experiment(args.experiment, tracking_uri=args.tracking_uri):
        page, runs = diagnose_dashboard(experiment=args.experiment, tracking_uri=args.tracking_uri, out=args.out,
                                        title=args.title)
        sys.stdout.write(f"{len(runs)} diagnosed model(s) in experiment {args.experiment!r}: "
                         f"{', '.join(r.name for r in runs)}\nwrote {args.out} ({len(page.encode()) / 1e6:.1f} MB)\n")
        return 0

    page, study = dashboard(experiment=args.experiment, run_id=args.run, tracking_uri=args.tracking_uri,
                            out=args.out, log=not args.no_log, title=args.title, sigmas=args.sigma)
    logged = "" if args.no_log else f"; logged as dashboard.html to run {study.parent_run_id}"
    sys.stdout.write(
        f"study run {study.parent_run_id} ({study.parent_run_name or 'unnamed'}) in experiment {study.experiment!r}: "
        f"{len(study.runs['train'])} train run(s), fits of {', '.join(study.fits)}\n"
        f"wrote {args.out} ({len(page.encode()) / 1e6:.1f} MB){logged}\n"
    )
    return 0
