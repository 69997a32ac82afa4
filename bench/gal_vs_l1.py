"""GAL against L1-norm filter pruning at matched MACs: accuracy before and after fine-tune, cost.

For each seed, on one baseline trained once:

1. ``gal`` (adversarial phase, label-free) prunes a copy of the baseline; its MACs set the target.
2. ``l1_filter`` prunes another copy at the ratio whose MACs come closest to GAL's (bisection on
   the ratio, MACs counted with ``deploy.count_flops`` on pruned copies).
3. Both are fine-tuned the same way (cross-entropy, SGD, same epochs and learning rate).

Accuracy is on the task's test split; latency is the median CPU time of one forward pass of one
example, one thread.

    python bench/gal_vs_l1.py                                  # digits, digits_cnn, 3 seeds
    python bench/gal_vs_l1.py --task cifar10 --cifar-root DIR --model resnet56 \\
        --baseline-checkpoint resnet56.pt                      # the paper's GAL-0.6 setting (GPU)

With ``--task cifar10`` the defaults follow the paper's GAL-0.6 run on ResNet-56 (official
lambda 0.6, mu 1, a FISTA step every 200 iterations, N(0, 1) masks, 100 adversarial epochs); the
paper reports 93.38% after fine-tune at 78.30M MACs (baseline 93.26%, 125.49M).
``--paper-lambda 0.8`` runs GAL-0.8 (91.58% after fine-tune, 49.99M MACs). The official code's
masks shrink twice as fast per unit of lambda as ours (``methods.gal.lam_from_official``), so
GAL-0.6 runs with ``lam`` 1.2 and GAL-0.8 with 1.6; ``--lam`` sets ``lam`` directly instead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# What each task runs unless a flag says otherwise.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": "digits_cnn",
        "baseline_epochs": 15,
        "baseline_lr": 0.05,
        "batch_size": 64,
        "lam": 0.1,
        "mu": 1.0,
        "mask_step": 1,
        "mask_lr": 0.01,
        "lr": 1e-3,
        "mask_init": "ones",
        "structure": "auto",
        "adversarial_epochs": 15,
        "finetune_epochs": 5,
        "finetune_lr": 0.05,
    },
    "cifar10": {
        "model": "resnet56",
        "baseline_epochs": 160,
        "baseline_lr": 0.1,
        "batch_size": 128,
        "paper_lambda": 0.6,
        "mu": 1.0,
        "mask_step": 200,
        "mask_lr": 0.01,
        "lr": 1e-3,
        "mask_init": "normal",
        "structure": "auto",
        "adversarial_epochs": 100,
        "finetune_epochs": 30,
        "finetune_lr": 0.01,
    },
}
#: The paper's ResNet-56 rows by their official lambda (baseline 93.26%, 125.49M MACs, 0.85M params).
PAPER_ROWS = {
    0.6: "paper GAL-0.6 (ResNet-56, CIFAR-10): 92.98% -> 93.38% after FT, 78.30M MACs, 0.75M params",
    0.8: "paper GAL-0.8 (ResNet-56, CIFAR-10): 90.36% -> 91.58% after FT, 49.99M MACs, 0.29M params",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(DEFAULTS), default="digits")
    parser.add_argument("--cifar-root", help="folder holding torchvision's cifar-10-batches-py (needed for --task cifar10)")
    parser.add_argument("--model", help="model name (default: digits_cnn for digits, resnet56 for cifar10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baseline-epochs", type=int)
    parser.add_argument("--baseline-lr", type=float)
    parser.add_argument("--baseline-checkpoint", help="a state_dict of the model; replaces baseline training")
    parser.add_argument("--batch-size", type=int)
    for name, typ in (("lam", float), ("mu", float), ("mask-step", int), ("mask-lr", float), ("lr", float),
                      ("mask-init", str), ("structure", str), ("adversarial-epochs", int), ("finetune-epochs", int),
                      ("finetune-lr", float)):  # fmt: skip
        parser.add_argument(
            f"--{name}",
            type=typ,
            help="gal's hyperparameter" if name not in ("finetune-epochs", "finetune-lr") else "of both methods' fine-tune",
        )
    parser.add_argument(
        "--paper-lambda", type=float, help="the official code's lambda, the paper's GAL-<lambda> name (0.6, 0.8); sets lam to twice it"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latency-repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if args.lam is not None and args.paper_lambda is not None:
        parser.error("--lam and --paper-lambda both set lam; give one")
    defaults = dict(DEFAULTS[args.task])
    if args.lam is not None or args.paper_lambda is not None:
        defaults.pop("lam", None)
        defaults.pop("paper_lambda", None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.task == "cifar10" and not args.cifar_root:
        parser.error("--task cifar10 needs --cifar-root DIR (the folder that holds cifar-10-batches-py)")
    return args


def build_space(args: argparse.Namespace):
    from search.space.spec import parse_space

    task: Any = (
        "digits"
        if args.task == "digits"
        else {"name": "cifar10", "options": {"root": str(Path(args.cifar_root).resolve()), "download": False}}
    )
    baseline: dict[str, Any] = {"epochs": args.baseline_epochs}
    if args.baseline_checkpoint:
        baseline = {"checkpoint": str(Path(args.baseline_checkpoint).resolve())}
    return parse_space(
        {
            "name": "gal_vs_l1",
            "task": task,
            "model": args.model,
            "baseline": baseline,
            "training": {"batch_size": args.batch_size, "lr": args.baseline_lr, "optimizer": "sgd"},
            "methods": {"gal": {}, "l1_filter": {}},
            "objectives": {"accuracy": "max", "macs": "min"},
            "measure": {"latency_batch_size": 1, "latency_repeats": args.latency_repeats},
        }
    )


def l1_ratio_for_macs(baseline: torch.nn.Module, ctx, target_macs: int) -> tuple[float, int]:
    """The l1_filter ratio whose pruned MACs come closest to ``target_macs`` (bisection, then the closer end)."""
    from deploy import count_flops
    from methods import create_method

    def macs_at(ratio: float) -> int:
        model = create_method("l1_filter", {"ratio": ratio}).prepare(copy.deepcopy(baseline), ctx)
        return count_flops(model, ctx.example_input).macs

    low, high = 0.0, 0.95  # MACs fall as the ratio grows
    macs_low, macs_high = macs_at(low), macs_at(high)
    for _ in range(14):
        mid = (low + high) / 2
        macs_mid = macs_at(mid)
        if macs_mid > target_macs:
            low, macs_low = mid, macs_mid
        else:
            high, macs_high = mid, macs_mid
    return (low, macs_low) if abs(macs_low - target_macs) <= abs(macs_high - target_macs) else (high, macs_high)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from methods import Phase, Pipeline, create_method, train_phase
    from methods.gal import lam_from_official
    from search.trial.body import measure, train_baseline, trainable_student
    from search.trial.context import load_task, seed_everything

    if args.paper_lambda is not None:
        args.lam = lam_from_official(args.paper_lambda)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the latency figure is per thread; small models gain nothing from more
    space = build_space(args)
    task = load_task(space)
    started = time.perf_counter()
    baseline, base_metrics = train_baseline(space, device, log=lambda m: None)
    baseline.eval()
    for p in baseline.parameters():
        p.requires_grad_(False)
    gal_params = {
        "lam": args.lam, "mu": args.mu, "mask_step": args.mask_step, "mask_lr": args.mask_lr, "lr": args.lr,
        "mask_init": args.mask_init, "structure": args.structure, "adversarial_epochs": args.adversarial_epochs, "finetune_epochs": 0,
    }  # fmt: skip
    print(f"task {args.task}, model {args.model}, device {device}, seeds {args.seeds}, torch {torch.__version__}")
    print(f"gal {gal_params}; fine-tune of both: {args.finetune_epochs} epochs, SGD lr {args.finetune_lr}, cross-entropy")
    print(
        f"baseline: accuracy {base_metrics['accuracy']:.4f}, {base_metrics['macs'] / 1e6:.3f}M MACs, {base_metrics['params'] / 1e3:.1f}k params ({time.perf_counter() - started:.0f} s)"
    )

    def student(seed: int):
        seed_everything(seed)
        model, ctx = trainable_student(space, task, baseline, device, seed)
        return model.train(), ctx

    def finetune_and_measure(model, ctx, row: dict[str, Any]) -> dict[str, Any]:
        before = measure(model, space, task, device, None)
        train_phase(model, Phase("finetune", args.finetune_epochs, lr=args.finetune_lr, optimizer="sgd"), ctx, loss_terms=[])
        after = measure(model, space, task, device, None)
        return {**row, "macs": before["macs"], "params": before["params"], "acc_before": before["accuracy"],
                "acc_after": after["accuracy"], "latency_ms": after["latency_ms"]}  # fmt: skip

    rows = [{"method": "baseline", "seed": "-", "setting": "-", "macs": base_metrics["macs"], "params": base_metrics["params"],
             "acc_before": base_metrics["accuracy"], "acc_after": base_metrics["accuracy"], "latency_ms": base_metrics["latency_ms"]}]  # fmt: skip
    for seed in args.seeds:
        t0 = time.perf_counter()
        model, ctx = student(seed)
        pipeline = Pipeline([create_method("gal", gal_params)])
        model = pipeline.run(model, ctx)
        gal = pipeline.metrics()
        removed = f"lam={args.lam:g}: {gal['gal.blocks_removed']:.0f} blocks, {gal['gal.channels_removed']:.0f} ch"
        rows.append(finetune_and_measure(model, ctx, {"method": "gal", "seed": seed, "setting": removed}))
        t1 = time.perf_counter()
        model, ctx = student(seed)
        ratio, _ = l1_ratio_for_macs(model, ctx, int(rows[-1]["macs"]))
        model = create_method("l1_filter", {"ratio": ratio}).prepare(model, ctx)
        rows.append(finetune_and_measure(model, ctx, {"method": "l1_filter", "seed": seed, "setting": f"ratio={ratio:.3f}"}))
        print(f"seed {seed}: gal {t1 - t0:.0f} s, l1_filter {time.perf_counter() - t1:.0f} s", flush=True)

    print()
    header = f"{'method':<10} {'seed':>4}  {'setting':<28} {'MACs':>10} {'params':>9} {'acc before FT':>13} {'acc after FT':>12} {'latency ms':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<10} {r['seed']!s:>4}  {r['setting']:<28} {r['macs']:>10,.0f} {r['params']:>9,.0f} {r['acc_before']:>13.4f} {r['acc_after']:>12.4f} {r['latency_ms']:>10.3f}"
        )
    print("-" * len(header))
    for method in ("gal", "l1_filter"):
        mine = [r for r in rows if r["method"] == method]
        mean = {k: statistics.fmean(r[k] for r in mine) for k in ("macs", "params", "acc_before", "acc_after", "latency_ms")}
        spread = statistics.pstdev(r["acc_after"] for r in mine)
        print(
            f"{method:<10} {'mean':>4}  {f'(after FT: sd {spread:.4f})':<28} {mean['macs']:>10,.0f} {mean['params']:>9,.0f} {mean['acc_before']:>13.4f} {mean['acc_after']:>12.4f} {mean['latency_ms']:>10.3f}"
        )
    if args.task == "cifar10" and args.paper_lambda in PAPER_ROWS:
        print(PAPER_ROWS[args.paper_lambda] + " (baseline 93.26%, 125.49M, 0.85M)")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
