"""`lossfloor evaluate`: reference statistics of a data set, and the sample quality of a model against them.

    lossfloor evaluate --reference --data SRC --features SPEC[,SPEC...] --out STATS.npz
    lossfloor evaluate (--model M | --samples DIR) --reference-stats STATS.npz --features SPEC --out DIR [--json]

SPEC: pixels[:K] | inception:FILE (FID) | dinov2:FILE (FD_DINOv2) | network:FILE (`lossfloor.train.metrics`).
The protocol and the files: `lossfloor.jobs.evaluate`, `lossfloor.train.quality`.
"""

from __future__ import annotations

import argparse
import json
import sys

from lossfloor.errors import InputError
from lossfloor.jobs.engine import Engine, add_engine_args
from lossfloor.jobs.evaluate import N_SAMPLES, SEEDS


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="sample quality: FD / FID / FD_DINOv2 of a model or a folder of images against reference statistics",
        description="With --reference: the feature statistics of a data set, written once. Otherwise: sample "
        "--n-samples images per seed from --model (EDM Heun, EDM2's settings; quantised to uint8 as saved PNGs) or "
        "read --samples DIR, and print the Fréchet distance of their features to the reference statistics, as "
        "mean and spread over the seeds.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--reference", action="store_true", help="write the reference statistics of --data to --out")
    what.add_argument("--model", metavar="M",
                      help="a lossfloor run folder or checkpoint, a diffusers folder, or a TorchScript / torch.export "
                      "file (with --prediction, --process), as lossfloor diagnose reads them")
    what.add_argument("--samples", metavar="DIR", help="a folder of PNG images to score instead of a model")
    p.add_argument("--data", default=None, metavar="SRC",
                   help="--reference: the data set; else optional: the model's data, checked against the statistics")
    p.add_argument("--features", required=True, metavar="SPEC[,SPEC...]",
                   help="pixels[:K] | inception:FILE (fid) | dinov2:FILE (fd_dinov2) | network:FILE (fd); the "
                   "network files are yours (nothing is downloaded)")
    p.add_argument("--reference-stats", default=None, metavar="STATS",
                   help="the statistics file of --reference (checked: same data, features and network files)")
    p.add_argument("--out", required=True, help="--reference: the statistics file (.npz); else the output folder")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--n-samples", type=int, default=None, metavar="N", help=f"samples per seed (default {N_SAMPLES})")
    p.add_argument("--seeds", type=int, default=None, metavar="S",
                   help=f"runs with seeds 0..S-1, reported as mean and spread (default {SEEDS})")
    p.add_argument("--sampler", default="heun", help="heun (EDM's deterministic Heun sampler; the only one)")
    p.add_argument("--steps", type=int, default=32, help="sampler steps (default 32, EDM2's: 63 evaluations)")
    p.add_argument("--sigma-min", type=float, default=0.002, help="default 0.002")
    p.add_argument("--sigma-max", type=float, default=80.0, help="default 80")
    p.add_argument("--rho", type=float, default=7.0, help="default 7")
    p.add_argument("--ema", default="auto",
                   help="lossfloor runs: auto | raw | SIGMA_REL | posthoc:SIGMA_REL (as lossfloor diagnose)")
    p.add_argument("--prediction", default=None,
                   help="TorchScript / torch.export models (and such a --guide-model): as lossfloor diagnose")
    p.add_argument("--process", default=None, help="TorchScript / torch.export models: as lossfloor diagnose")
    p.add_argument("--guidance", type=float, default=1.0, metavar="S",
                   help="D = D_guide + S (D - D_guide) with --guide-model (default 1: no guidance)")
    p.add_argument("--guide-model", default=None, metavar="M2",
                   help="the guide: an unconditional model (classifier-free guidance) or a smaller / less-trained "
                   "conditional one (autoguidance)")
    p.add_argument("--guide-ema", default="auto", help="the guide's --ema (lossfloor runs)")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a latent model: the data set's VAE (a diffusers AutoencoderKL folder, e.g. sd-vae-ft-mse) "
                   "that decodes its samples to images before the features")
    p.add_argument("--latent-stats", default=None, metavar="SRC",
                   help="with --vae: the latent set (lossfloor data encode output, EDM2 latents) whose per-channel "
                   "statistics un-whiten the samples (default EDM2's constants for SD-VAE latents of ImageNet)")
    p.add_argument("--batch", type=int, default=256, help="images per sampler / feature batch (default 256)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--precision", default="none", help="autocast of the model: none | bf16 | fp16 (CUDA)")
    add_engine_args(p, ray="sample blocks over Ray actors; same numbers", workers_help="actors",
                    worker="actor", gpus_help="> 0 samples on CUDA")
    trk = p.add_argument_group("tracking")
    trk.add_argument("--mlflow", action="store_true", help="log the metrics and the statistics files to MLflow")
    trk.add_argument("--mlflow-experiment", default="evaluate", metavar="NAME", help="default evaluate")
    trk.add_argument("--run-name", default=None, help="MLflow run name")
    trk.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.set_defaults(func=run)


def _only_for_models(args, engine: Engine) -> None:
    flags = {"--engine": None if engine.kind == "local" else engine.kind, "--reference-stats": args.reference_stats, "--n-samples": args.n_samples, "--seeds": args.seeds,
             "--guide-model": args.guide_model, "--vae": args.vae, "--latent-stats": args.latent_stats,
             "--mlflow": args.mlflow or None}
    for flag, value in flags.items():
        if value is not None:
            raise InputError(f"{flag}: not with --reference (it writes the statistics of --data)")


def run(args: argparse.Namespace) -> int:
    from lossfloor.jobs.evaluate import EvaluateSpec, ReferenceSpec, evaluate, reference
    from lossfloor.jobs.tracking import open_tracking
    from lossfloor.train.quality import SamplerSettings

    engine = Engine.from_args(args)
    if args.reference:
        _only_for_models(args, engine)
        if args.data is None:
            raise InputError("--data: --reference needs the data set")
        ref = reference(ReferenceSpec(data=args.data, features=args.features, out=args.out, batch=args.batch,
                                      device=args.device))
        sys.stdout.write(f"wrote {args.out}: {', '.join(e['spec'] for e in ref.extractors.values())} statistics of "
                         f"{args.data} ({next(iter(ref.stats.values()))[0]} images, fingerprint {ref.fingerprint[:12]})\n")
        return 0
    if args.reference_stats is None:
        raise InputError("--reference-stats: needed (write it with lossfloor evaluate --reference)")
    if args.samples is not None and (args.n_samples is not None or args.seeds is not None):
        raise InputError(f"--{'n-samples' if args.n_samples is not None else 'seeds'}: only with --model "
                         "(--samples scores every image of the folder once)")
    settings = SamplerSettings(num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho)
    tracking = open_tracking(args.mlflow, args.tracking_uri, experiment=args.mlflow_experiment,
                             run_name=args.run_name)
    spec = EvaluateSpec(model=args.model, samples=args.samples, reference_stats=args.reference_stats,
                        features=args.features, out=args.out, data=args.data,
                        n_samples=N_SAMPLES if args.n_samples is None else args.n_samples,
                        seeds=SEEDS if args.seeds is None else args.seeds, sampler=args.sampler, settings=settings,
                        ema=args.ema, prediction=args.prediction, process=args.process, guidance=args.guidance,
                        guide_model=args.guide_model, guide_ema=args.guide_ema, vae=args.vae,
                        latent_stats=args.latent_stats, batch=args.batch, device=args.device,
                        precision=args.precision, engine=engine, tracking=tracking)
    result = evaluate(spec)
    if args.json:
        json.dump({k: result[k] for k in result["metrics"]} | {k: v for k, v in result.items() if k not in result["metrics"]},
                  sys.stdout)
        sys.stdout.write("\n")
        return 0
    for k in result["metrics"]:
        m = result[k]
        spread = f" ± {m['std']:.4g} (min {m['min']:.4g}, max {m['max']:.4g}, {len(m['per_seed'])} seeds)" \
            if len(m["per_seed"]) > 1 else ""
        sys.stdout.write(f"{k} {m['mean']:.4g}{spread}  [{result['features'][k]}, {result['n_samples']} samples]\n")
    sys.stdout.write(f"wrote {args.out}/metrics.json\n")
    return 0
