"""KSE against L1-norm filter pruning at matched parameters and at matched MACs: accuracy, size, MACs, CPU latency.

Part 1, accuracy (digits, for each model and seed, on one baseline trained once per model):

1. ``kse`` (``levels`` G, ``halvings`` T) compresses a copy of the baseline and fine-tunes it; its
   ``params`` (centroids, full kernels and one weight per packed index) and its ``macs`` (what its
   deployed model runs: each layer on the path ``auto`` chose, as a trial measures them) set
   the targets.
2. ``l1_filter =params`` prunes another copy at the ratio whose ``params`` come closest to KSE's,
   and ``l1_filter =MACs`` another at the ratio whose ``macs`` do (bisection; the ``setting``
   column gives the ratio and how far the matched figure is from KSE's); each then fine-tunes the
   same way (cross-entropy, SGD, same epochs and learning rate). KSE keeps every filter and
   clusters kernels, so at equal params it runs more MACs than filter pruning: the first row
   compares storage, the second compute.

Part 2, speed (random-init ``resnet20`` at 3x32x32, as the issue asks): the baseline, KSE at the
same G and T with each layer forced to the dense and to the clustered path, and with the path
``auto`` picks at the timing batch, and l1_filter at matched params and at the MACs of KSE's dense
path; median CPU latency (one thread) at batch 1 and 64 and the MACs each path runs.

    python bench/kse_vs_l1.py                                   # digits_resnet and resnet20, 3 seeds
    python bench/kse_vs_l1.py --models resnet20 --seeds 0 --finetune-epochs 2

The paper's CIFAR-10 ResNet-56 setting (G = 4, T = 0; 93.23% at 60M FLOPs, 0.43M params from a
93.26% baseline; fine-tune SGD lr 0.01, momentum 0.9, wd 1e-5, batch 128, 200 epochs, x0.1 at 100)
is one command on a GPU machine (not run here):

    python bench/kse_vs_l1.py --task cifar10 --cifar-root DIR --models resnet56 --seeds 0 \\
        --baseline-checkpoint resnet56.pt --levels 4 --halvings 0 --finetune-epochs 200 \\
        --finetune-lr 0.01 --weight-decay 1e-5 --batch-size 128 --skip-speed

(The fine-tune's learning rate follows the training loop's cosine schedule, not the paper's
step down at epoch 100.)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--cifar-root", help="folder holding torchvision's cifar-10-batches-py (needed for --task cifar10)")
    parser.add_argument("--models", nargs="+", default=["digits_resnet", "resnet20"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--baseline-lr", type=float, default=0.05)
    parser.add_argument("--baseline-checkpoint", help="a state_dict of the model; replaces baseline training (one model only)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--weight-decay", type=float, default=5e-4, help="of the baseline and both fine-tunes (the paper's KSE fine-tune: 1e-5)"
    )
    parser.add_argument("--levels", type=int, default=4, help="kse's G")
    parser.add_argument("--halvings", type=int, default=0, help="kse's T")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="of both methods")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="of both methods (the paper's 0.01)")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--skip-speed", action="store_true", help="skip part 2 (random-init resnet20 timing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.task == "cifar10" and not args.cifar_root:
        parser.error("--task cifar10 needs --cifar-root DIR (the folder that holds cifar-10-batches-py)")
    return args


def build_space(args: argparse.Namespace, model: str):
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
            "name": "kse_vs_l1",
            "task": task,
            "model": model,
            "baseline": baseline,
            "training": {"batch_size": args.batch_size, "lr": args.baseline_lr, "optimizer": "sgd", "weight_decay": args.weight_decay},
            "methods": {"l1_filter": {}, "kse": {}},  # the order check_pipeline admits
            "objectives": {"accuracy": "max", "params": "min"},
            "measure": {"latency_batch_size": 1, "latency_repeats": args.latency_repeats},
        }
    )


def l1_ratio_for(baseline: torch.nn.Module, ctx, figure: str, target: float) -> tuple[float, int]:
    """The l1_filter ratio whose pruned ``figure`` (``"params"`` or ``"macs"``) comes closest to ``target`` (bisection, then the closer end)."""
    from deploy import count_flops, count_params
    from methods import create_method

    def figure_at(ratio: float) -> int:
        model = create_method("l1_filter", {"ratio": ratio}).prepare(copy.deepcopy(baseline), ctx)
        return count_params(model) if figure == "params" else count_flops(model, ctx.example_input).macs

    low, high = 0.0, 0.95  # both fall as the ratio grows
    at_low, at_high = figure_at(low), figure_at(high)
    for _ in range(12):
        mid = (low + high) / 2
        at_mid = figure_at(mid)
        if at_mid > target:
            low, at_low = mid, at_mid
        else:
            high, at_high = mid, at_mid
    return (low, at_low) if abs(at_low - target) <= abs(at_high - target) else (high, at_high)


def matched(ratio: float, got: float, target: float) -> str:
    """The ``setting`` of a matched l1_filter row: its ratio and how far the matched figure is from the target (``*``: more than 2%)."""
    off = got / target - 1
    return f"ratio={ratio:.4f} ({off:+.1%}){' *' if abs(off) > 0.02 else ''}"


def set_path(model: torch.nn.Module, path: str) -> None:
    from methods.kse import ClusteredConv2d

    for module in model.modules():
        if isinstance(module, ClusteredConv2d):
            module.path = path


def path_macs(model: torch.nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs the counter sees with every clustered layer on each path; the chosen paths are restored."""
    from deploy import count_flops
    from methods.kse import ClusteredConv2d

    chosen = {m: m.path for m in model.modules() if isinstance(m, ClusteredConv2d)}
    out = {}
    for path in ("dense", "clustered"):
        set_path(model, path)
        out[path] = count_flops(model, example).macs
    for module, path in chosen.items():
        module.path = path
    return out


def latencies(model: torch.nn.Module, shape: tuple[int, ...], repeats: int, device: torch.device) -> dict[int, float]:
    from deploy import latency_ms

    generator = torch.Generator().manual_seed(0)
    return {batch: latency_ms(model, torch.randn(batch, *shape, generator=generator).to(device), repeats=repeats) for batch in (1, 64)}


def accuracy_part(args: argparse.Namespace, model_name: str, device: torch.device) -> list[dict[str, Any]]:
    from deploy import count_flops, count_params, size_bytes
    from methods import Phase, Pipeline, create_method, train_phase
    from search.trial.body import train_baseline, trainable_student
    from search.trial.context import load_task, seed_everything

    space = build_space(args, model_name)
    task = load_task(space)
    started = time.perf_counter()
    baseline, base_metrics = train_baseline(space, device, log=lambda m: None)
    baseline.eval()
    for p in baseline.parameters():
        p.requires_grad_(False)
    shape = tuple(task.input_shape)
    example = torch.zeros(1, *shape, device=device)
    print(f"\n== {model_name} on {args.task}: baseline accuracy {base_metrics['accuracy']:.4f}, {base_metrics['params']:,} params, "
          f"{base_metrics['macs']:,} MACs ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip

    def student(seed: int):
        seed_everything(seed)
        model, ctx = trainable_student(space, task, baseline, device, seed)
        return model.train(), ctx

    def evaluate(model, ctx) -> float:
        return task.evaluate(model, _loader(task, space), str(device))["accuracy"]

    lat = latencies(baseline, shape, args.latency_repeats, device)
    macs = base_metrics["macs"]
    rows = [{"method": "baseline", "seed": "-", "setting": "-", "accuracy": base_metrics["accuracy"], "params": base_metrics["params"],
             "size": size_bytes(baseline), "macs": macs, "macs_dense": macs, "macs_clustered": macs, "paths": "-", "lat1": lat[1],
             "lat64": lat[64]}]  # fmt: skip
    kse_params = {"levels": args.levels, "halvings": args.halvings, "epochs": args.finetune_epochs, "lr": args.finetune_lr, "path": "auto"}
    for seed in args.seeds:
        t0 = time.perf_counter()
        model, ctx = student(seed)
        pipeline = Pipeline([create_method("kse", kse_params)])
        model = pipeline.run(model, ctx).eval()
        m = pipeline.metrics()
        both = path_macs(model, example)
        lat = latencies(model, shape, args.latency_repeats, device)
        target = {"params": count_params(model), "macs": count_flops(model, example).macs}
        rows.append({"method": "kse", "seed": seed, "setting": f"G={args.levels} T={args.halvings}, -{m['kse.channels_removed_fraction']:.0%} ch",
                     "accuracy": evaluate(model, ctx), "params": target["params"], "size": size_bytes(model), "macs": target["macs"],
                     "macs_dense": both["dense"], "macs_clustered": both["clustered"],
                     "paths": f"{m['kse.clustered_path_layers']:.0f}c/{m['kse.dense_path_layers']:.0f}d", "lat1": lat[1], "lat64": lat[64]})  # fmt: skip
        t1 = time.perf_counter()
        for figure, label in (("params", "=params"), ("macs", "=MACs")):
            model, ctx = student(seed)
            ratio, got = l1_ratio_for(model, ctx, figure, target[figure])
            model = create_method("l1_filter", {"ratio": ratio}).prepare(model, ctx)
            train_phase(model, Phase("finetune", args.finetune_epochs, lr=args.finetune_lr, optimizer="sgd"), ctx, loss_terms=[])
            model.eval()
            lat = latencies(model, shape, args.latency_repeats, device)
            macs = count_flops(model, example).macs
            rows.append({"method": f"l1_filter {label}", "seed": seed, "setting": matched(ratio, got, target[figure]),
                         "accuracy": evaluate(model, ctx), "params": count_params(model), "size": size_bytes(model), "macs": macs,
                         "macs_dense": macs, "macs_clustered": macs, "paths": "-", "lat1": lat[1], "lat64": lat[64]})  # fmt: skip
        print(f"seed {seed}: kse {t1 - t0:.0f} s, l1_filter (both) {time.perf_counter() - t1:.0f} s", flush=True)
    print_table(rows, f"{model_name} ({args.task} test accuracy; latency at {'x'.join(map(str, shape))})")
    return rows


def _loader(task, space):
    from torch.utils.data import DataLoader

    return DataLoader(task.test_set, batch_size=256)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    header = (f"{'method':<18} {'seed':>4}  {'setting':<24} {'accuracy':>8} {'params':>9} {'size B':>9} {'MACs run':>12} {'MACs dense':>12} "
              f"{'MACs clust.':>12} {'paths':>6} {'ms b=1':>8} {'ms b=64':>8}")  # fmt: skip
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for r in rows:
        print(f"{r['method']:<18} {r['seed']!s:>4}  {r['setting']:<24} {r['accuracy']:>8.4f} {r['params']:>9,.0f} {r['size']:>9,.0f} "
              f"{r['macs']:>12,.0f} {r['macs_dense']:>12,.0f} {r['macs_clustered']:>12,.0f} {r['paths']:>6} {r['lat1']:>8.3f} {r['lat64']:>8.2f}")  # fmt: skip
    if any(r["setting"].endswith(" *") for r in rows):
        print("* matched figure more than 2% from KSE's: no l1_filter ratio comes closer (it removes whole filters per layer)")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["seed"] != "-")) if len(rows) > len({r["method"] for r in rows}) else []
    if methods:
        print("-" * len(header))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        mean = {
            k: statistics.fmean(r[k] for r in mine)
            for k in ("accuracy", "params", "size", "macs", "macs_dense", "macs_clustered", "lat1", "lat64")
        }
        sd = statistics.pstdev(r["accuracy"] for r in mine) if len(mine) > 1 else 0.0
        print(f"{method:<18} {'mean':>4}  {f'(accuracy sd {sd:.4f})':<24} {mean['accuracy']:>8.4f} {mean['params']:>9,.0f} {mean['size']:>9,.0f} "
              f"{mean['macs']:>12,.0f} {mean['macs_dense']:>12,.0f} {mean['macs_clustered']:>12,.0f} {'':>6} {mean['lat1']:>8.3f} "
              f"{mean['lat64']:>8.2f}")  # fmt: skip


def speed_part(args: argparse.Namespace, device: torch.device) -> None:
    """Random-init resnet20 at 3x32x32: what each KSE path really costs against the dense model."""
    from deploy import count_flops, count_params, size_bytes
    from methods import MethodContext, create_method
    from models import create_model

    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=10, in_channels=3).to(device).eval()
    shape = (3, 32, 32)
    example = torch.zeros(1, *shape, device=device)
    ctx = MethodContext(
        teacher=base,
        train_loader=[],
        val_loader=[],
        task_loss=None,
        evaluate=None,
        example_input=example,
        device=device,
        log=lambda m: None,
    )
    rows = []

    def row(name: str, model: torch.nn.Module, setting: str, paths: str = "-") -> dict[str, Any]:
        both = path_macs(model, example)
        lat = latencies(model, shape, args.latency_repeats, device)
        rows.append({"method": name, "seed": 0, "setting": setting, "accuracy": float("nan"), "params": count_params(model), "size": size_bytes(model),
                     "macs": count_flops(model, example).macs, "macs_dense": both["dense"], "macs_clustered": both["clustered"], "paths": paths,
                     "lat1": lat[1], "lat64": lat[64]})  # fmt: skip
        return rows[-1]

    base_row = row("baseline", base, "random init")
    forced = {}
    for path in ("dense", "clustered"):
        method = create_method("kse", {"levels": args.levels, "halvings": args.halvings, "path": path})
        model = method.finalize(method.prepare(copy.deepcopy(base), ctx), ctx).eval()
        m = method.metrics()
        forced[path] = row(f"kse {path}", model, f"G={args.levels} T={args.halvings}, -{m['channels_removed_fraction']:.0%} ch")
    for batch in (1, 64):
        method = create_method("kse", {"levels": args.levels, "halvings": args.halvings, "path": "auto", "timing_batch_size": batch})
        model = method.finalize(method.prepare(copy.deepcopy(base), ctx), ctx).eval()
        m = method.metrics()
        row(
            f"kse auto@b{batch}",
            model,
            f"G={args.levels} T={args.halvings}",
            f"{m['clustered_path_layers']:.0f}c/{m['dense_path_layers']:.0f}d",
        )
    for figure, label in (("params", "=params"), ("macs", "=MACs")):
        ratio, got = l1_ratio_for(base, ctx, figure, forced["dense"][figure])
        pruned = create_method("l1_filter", {"ratio": ratio}).prepare(copy.deepcopy(base), ctx).eval()
        row(f"l1_filter {label}", pruned, matched(ratio, got, forced["dense"][figure]))
    print_table(rows, "resnet20, random init, 3x32x32 (speed only; no accuracy)")
    clustered = forced["clustered"]
    print(
        f"\nclustered path at G={args.levels}, batch 64: {base_row['macs_dense'] / clustered['macs_clustered']:.2f}x fewer MACs than the dense "
        f"baseline, real speed-up {base_row['lat64'] / clustered['lat64']:.2f}x (target 1.5x); batch 1: {base_row['lat1'] / clustered['lat1']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # latency per thread; small models gain little from more
    started = time.perf_counter()
    print(f"task {args.task}, models {args.models}, seeds {args.seeds}, device {device}, torch {torch.__version__}, "
          f"G={args.levels} T={args.halvings}, fine-tune {args.finetune_epochs} epochs SGD lr {args.finetune_lr}")  # fmt: skip
    for model_name in args.models:
        accuracy_part(args, model_name, device)
    if not args.skip_speed:
        speed_part(args, device)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
