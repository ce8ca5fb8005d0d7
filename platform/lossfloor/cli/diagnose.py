"""`lossfloor diagnose`: the loss gap J(σ) − J*(σ) of a diffusion model, per σ, in x0 units.

    lossfloor diagnose --model SPEC --data SRC [--j-star TABLE] (--sigma-grid MIN:MAX:COUNT | --sigmas LIST)
                       --out diag.parquet [--figure diag.html] [--holdout SRC] [--mlflow]

SPEC: a lossfloor run folder or checkpoint, a diffusers folder (model + scheduler), or a TorchScript /
torch.export file with --prediction and --process (`lossfloor.diagnose.models`). Writes the diagnosis
table (`lossfloor.diagnose.measure`) and an offline HTML figure, prints the table.
"""

from __future__ import annotations

import argparse
import sys

from lossfloor.errors import InputError
from lossfloor.jobs.engine import Engine, add_engine_args

N_SAMPLES = 4096  # default evaluation samples (at most the data's)


def register(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="the loss gap J - J* per sigma of a diffusion model (lossfloor, diffusers or TorchScript)",
        description="Measure a model's loss per noise level in x0 units against the optimal loss J* of its "
        "training data (Xu et al. §3): the gap J - J*, the relative gap, and totals under the model's own and "
        "a fixed reference weighting.",
    )
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="a lossfloor run folder or checkpoint-<n_img> folder; a diffusers folder (model_index.json, "
                   "or config.json + scheduler_config.json; DDPM/DDIM epsilon|v_prediction|sample, FlowMatchEuler"
                   "Discrete); or a TorchScript / torch.export (.pt2) file whose forward(x, t) returns --prediction")
    p.add_argument("--data", required=True, help="the model's training data (any `lossfloor estimate --data` source)")
    p.add_argument("--j-star", default=None, metavar="TABLE",
                   help="J* table of the same data (checked by fingerprint); default: estimated here")
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--sigma-grid", help="log-spaced grid MIN:MAX:COUNT, e.g. 0.01:80:16")
    grid.add_argument("--sigmas", help="comma-separated noise levels, e.g. 0.1,0.5,2")
    p.add_argument("--out", required=True, help="output diagnosis table, FILE.parquet")
    p.add_argument("--figure", default=None, metavar="FILE.html",
                   help="the figure (default: OUT with .html; 'none' for no figure)")
    p.add_argument("--holdout", default=None, metavar="SRC",
                   help="held-out data: adds its loss and the generalisation gap as columns")
    p.add_argument("--prediction", default=None,
                   help="TorchScript / torch.export: what forward returns: x0 | eps | score | vp-v | fm-velocity")
    p.add_argument("--process", default=None,
                   help="TorchScript / torch.export: the coordinates forward takes: ve (x0 + σε, σ; default) | vp "
                   "(x/sqrt(1+σ²), σ) | fm (x/(1+σ), σ/(1+σ))")
    p.add_argument("--ema", default="auto",
                   help="lossfloor runs: auto (what the run evaluated) | raw | SIGMA_REL (a tracked EMA) | "
                   "posthoc:SIGMA_REL (from its EMA snapshots)")
    p.add_argument("--estimator", default="auto", help="estimator of J* when no --j-star is given (default auto)")
    p.add_argument("--n-samples", type=int, default=N_SAMPLES, metavar="N",
                   help=f"evaluation samples (default {N_SAMPLES}, at most the data's)")
    p.add_argument("--seed", type=int, default=0,
                   help="samples and noise: the same seed gives every model the same draws (default 0)")
    p.add_argument("--batch", type=int, default=256, help="forward batch (memory only; default 256)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--precision", default="none", help="autocast of the network: none (fp32; a lossfloor run: its own) | bf16 | fp16 (CUDA)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_engine_args(p, ray="sigma x sample-batch blocks over Ray actors; same numbers",
                    workers_help="actors, all at once", worker="actor", gpus_help="> 0 evaluates on CUDA")
    trk = p.add_argument_group("tracking")
    trk.add_argument("--mlflow", action="store_true",
                     help="also log the diagnosis to MLflow (params, per-sigma metrics, the table, the figure)")
    trk.add_argument("--mlflow-experiment", default="diagnose", metavar="NAME", help="default diagnose")
    trk.add_argument("--run-name", default=None, help="MLflow run name (default: the model's name)")
    trk.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from lossfloor.diffusion import parse_sigma_grid, parse_sigmas
    from lossfloor.jobs.diagnose import DiagnoseSpec, default_figure, diagnose

    sigmas = parse_sigmas(args.sigmas) if args.sigmas is not None else parse_sigma_grid(args.sigma_grid)
    if args.n_samples < 2:
        raise InputError(f"--n-samples: expected an integer >= 2, got {args.n_samples}")
    figure = None if args.figure == "none" else (args.figure or default_figure(args.out))
    spec = DiagnoseSpec(model=args.model, data=args.data, sigmas=sigmas, out=args.out, figure=figure,
                        sigma_flag="--sigmas" if args.sigmas is not None else "--sigma-grid",
                        j_star=args.j_star, estimator=args.estimator, holdout=args.holdout,
                        prediction=args.prediction, process=args.process, ema=args.ema, seed=args.seed,
                        n_samples=args.n_samples, batch=args.batch, device=args.device, precision=args.precision,
                        mlflow=args.mlflow, experiment=args.mlflow_experiment, run_name=args.run_name,
                        tracking_uri=args.tracking_uri, engine=Engine.from_args(args))
    d = diagnose(spec)
    if args.json:
        rows = [{k: (v if not isinstance(v, float) or (v == v and abs(v) != float("inf")) else str(v))
                 for k, v in r.items()} for r in d.rows()]
        json.dump({"rows": rows, "totals": d.totals}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from lossfloor.diagnose import format_diagnosis

        sys.stdout.write(format_diagnosis(d) + "\n")
        sys.stdout.write(f"wrote {args.out}" + (f" and {figure}" if figure else "") + "\n")
    return 0
