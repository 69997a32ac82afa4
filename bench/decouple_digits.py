"""decouple on digits: accuracy against expected dynamic MACs and static MACs, l1_filter at matched static MACs.

For each model (``digits_cnn``, ``digits_resnet``), one baseline trained once; for each seed and
each ``lambda_s`` of the sweep:

1. ``decouple`` (defaults otherwise, ``--epochs`` of gated training) gates a copy of the baseline;
   finalize removes the filters never open on the validation data. Its static form's MACs (the
   counter's) and its dynamic form's expected MACs per validation sample are read
   from the method's figures; both forms compute the same function, so they share the test
   accuracy. kNN accuracy on the paths and the FGSM detection figures come from the same figures:
   ``AUROC`` is over the successful attacks (FGSM inputs that change the prediction, against the
   clean inputs), ``(all)`` over every FGSM input, failed attacks included, and ``FGSM ok`` the
   attack's success rate. ``ms static/dyn`` are the CPU latencies of both forms at batch 1 (what
   a trial logs whatever its ``form``): a ``macs`` objective favours the dynamic form, the
   latency the static one on CPU.
2. ``l1_filter`` prunes another copy at the ratio whose MACs come closest to decouple's static
   MACs (``bench/gal_vs_l1.py``'s bisection) and fine-tunes for the same number of epochs.

Targets (issue 16): dynamic MACs at least 1.5x below static MACs at equal accuracy; AUROC > 0.8.
The table prints, per setting, the mean over seeds and the ratio static / dynamic MACs. The last
run, every ``lambda_s`` row, is in the README's ``decouple`` entry.

    python bench/decouple_digits.py                       # both models, 3 seeds, 4 lambda_s values
    python bench/decouple_digits.py --models digits_cnn --seeds 0 --lambda-s 0.001
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "digits_resnet"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambda-s", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--epochs", type=int, default=20, help="decouple's gated training and l1_filter's fine-tune")
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def build_space(model: str, args: argparse.Namespace):
    from search.space.spec import parse_space

    return parse_space(
        {
            "name": "decouple_digits",
            "task": "digits",
            "model": model,
            "baseline": {"epochs": args.baseline_epochs},
            "training": {"batch_size": 64, "lr": 0.05, "optimizer": "sgd"},
            "methods": {"l1_filter": {"optional": True}, "decouple": {"optional": True}},
            "objectives": {"accuracy": "max", "macs": "min"},
            "budget": {"epochs": args.epochs},
            "measure": {"latency_batch_size": 1, "latency_repeats": 20},
        }
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from gal_vs_l1 import l1_ratio_for_macs

    from methods import Pipeline, create_method
    from search.trial.body import measure, train_baseline, trainable_student
    from search.trial.context import load_task, seed_everything

    device = torch.device(args.device)
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(
        f"models {args.models}, seeds {args.seeds}, lambda_s {args.lambda_s}, {args.epochs} epochs, device {device}, torch {torch.__version__}"
    )
    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        space = build_space(model_name, args)
        task = load_task(space)
        baseline, base = train_baseline(space, device, log=lambda m: None)
        baseline.eval()
        for p in baseline.parameters():
            p.requires_grad_(False)
        print(f"{model_name} baseline: accuracy {base['accuracy']:.4f}, {base['macs']:,.0f} MACs", flush=True)
        rows.append(
            {
                "model": model_name,
                "method": "baseline",
                "lambda_s": float("nan"),
                "seed": -1,
                "accuracy": base["accuracy"],
                "static": base["macs"],
                "dynamic": base["macs"],
            }
        )

        def student(seed: int):
            seed_everything(seed)
            model, ctx = trainable_student(space, task, baseline, device, seed)  # noqa: B023  called within this iteration
            return model.train(), ctx

        for lambda_s in args.lambda_s:
            for seed in args.seeds:
                t0 = time.perf_counter()
                model, ctx = student(seed)
                pipeline = Pipeline([create_method("decouple", {"lambda_s": lambda_s, "form": "static", "epochs": args.epochs})])
                model = pipeline.run(model, ctx)
                figures = pipeline.metrics()
                accuracy = measure(model, space, task, device, None)["accuracy"]
                row = {"model": model_name, "method": "decouple", "lambda_s": lambda_s, "seed": seed, "accuracy": accuracy,
                       "static": figures["decouple.static_macs"], "dynamic": figures["decouple.dynamic_macs"],
                       "knn": figures["decouple.knn_accuracy"], "auroc": figures["decouple.fgsm_auroc"], "active": figures["decouple.active_ratio"],
                       "auroc_all": figures["decouple.fgsm_auroc_all"], "success": figures["decouple.fgsm_success"],
                       "lat_static": figures["decouple.latency_ms_static"], "lat_dynamic": figures["decouple.latency_ms_dynamic"],
                       "lat_union": figures["decouple.latency_ms_union_batch"], "lat_per_sample": figures["decouple.latency_ms_per_sample_batch"]}  # fmt: skip
                rows.append(row)
                model, ctx = student(seed)
                ratio, _ = l1_ratio_for_macs(model, ctx, int(row["static"]))
                pruned = Pipeline([create_method("l1_filter", {"ratio": ratio})]).run(model, ctx)
                l1 = measure(pruned, space, task, device, None)
                rows.append(
                    {
                        "model": model_name,
                        "method": "l1_filter",
                        "lambda_s": lambda_s,
                        "seed": seed,
                        "accuracy": l1["accuracy"],
                        "static": l1["macs"],
                        "dynamic": l1["macs"],
                        "ratio": ratio,
                    }
                )
                print(f"  {model_name} lambda_s {lambda_s:g} seed {seed}: decouple {accuracy:.4f} at {row['static']:,.0f} static / {row['dynamic']:,.0f} dynamic MACs, "
                      f"AUROC {row['auroc']:.3f} (all {row['auroc_all']:.3f}, FGSM success {row['success']:.1%}), "
                      f"l1_filter {l1['accuracy']:.4f} at {l1['macs']:,.0f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    print()
    header = (f"{'model':<14} {'lambda_s':>8}  {'decouple acc':>12} {'static MACs':>11} {'dynamic MACs':>12} {'static/dyn':>10} {'active':>6} "
              f"{'kNN acc':>7} {'AUROC':>6} {'(all)':>6} {'FGSM ok':>7} {'l1 acc':>7} {'l1 MACs':>9}  {'ms static/dyn (b1)':>18}  {'ms union/per-sample (b16)':>25}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for model_name in args.models:
        base = next(r for r in rows if r["model"] == model_name and r["method"] == "baseline")
        print(f"{model_name:<14} {'baseline':>8}  {base['accuracy']:>12.4f} {base['static']:>11,.0f}")
        for lambda_s in args.lambda_s:
            mine = [r for r in rows if r["model"] == model_name and r["method"] == "decouple" and r["lambda_s"] == lambda_s]
            l1 = [r for r in rows if r["model"] == model_name and r["method"] == "l1_filter" and r["lambda_s"] == lambda_s]
            m = {k: statistics.fmean(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], float)}
            l1_acc, l1_macs = statistics.fmean(r["accuracy"] for r in l1), statistics.fmean(r["static"] for r in l1)
            sd = statistics.pstdev(r["accuracy"] for r in mine)
            print(f"{model_name:<14} {lambda_s:>8g}  {m['accuracy']:>7.4f}±{sd:.3f} {m['static']:>11,.0f} {m['dynamic']:>12,.0f} {m['static'] / m['dynamic']:>10.2f} "
                  f"{m['active']:>6.2f} {m['knn']:>7.3f} {m['auroc']:>6.3f} {m['auroc_all']:>6.3f} {m['success']:>7.1%} {l1_acc:>7.4f} {l1_macs:>9,.0f}  "
                  f"{m['lat_static']:>8.3f}/{m['lat_dynamic']:<9.3f}  {m['lat_union']:>12.3f}/{m['lat_per_sample']:<12.3f}")  # fmt: skip
    print(
        f"targets: static/dyn >= 1.5 at equal accuracy (both forms compute the same function); AUROC > 0.8. total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
