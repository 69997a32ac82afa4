"""Cheap students on digits: one trained alone with cross-entropy against the best ``od`` student.

For each cheap convolution (dw, shift, group with g=2) and each seed, starting from the same
briefly trained baseline:

(a) solo: the baseline with its 3x3 convolutions made cheap (the layers it keeps start from the
    baseline's weights), trained alone with cross-entropy for E epochs;
(b) od: ``--students`` such students plus the online teacher, trained together with the OD loss
    for the same E epochs; the student with the best validation accuracy is kept.

Both use the same optimizer, learning rate and batches. Printed per run: parameters, MACs
(``deploy.count_flops``), test accuracy, CPU latency at batch 1
(``deploy.latency_ms``) and, for od, the teacher's test accuracy; then the mean and
standard deviation per (conv, mode).

    python bench/od_students.py --seeds 0 1 2 --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy import count_flops, count_params, latency_ms  # noqa: E402
from methods import MethodContext, Phase, create_method, train_phase  # noqa: E402
from methods._cheap_conv import replace_3x3_convs  # noqa: E402
from methods._surgery import first_layers  # noqa: E402
from models import create_model  # noqa: E402
from tasks import Task, create_task  # noqa: E402

CONVS = (("dw", 2), ("shift", 2), ("group", 2))


def context(task: Task, teacher: torch.nn.Module, seed: int, epochs: int, lr: float, batch_size: int) -> MethodContext:
    val = list(DataLoader(task.val_set, batch_size=256))
    train = DataLoader(task.train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return MethodContext(
        teacher=teacher,
        train_loader=train,
        val_loader=val,
        task_loss=task.loss,
        evaluate=lambda model: task.evaluate(model, val, "cpu"),
        example_input=task.example_input(1),
        device=torch.device("cpu"),
        epochs=epochs,
        lr=lr,
        seed=seed,
        log=lambda message: None,
    )


def measure(model: torch.nn.Module, task: Task) -> dict[str, float]:
    model.eval()
    example = task.example_input(1)
    test = DataLoader(task.test_set, batch_size=256)
    return {
        "params": count_params(model),
        "macs": count_flops(model, example).macs,
        "accuracy": task.evaluate(model, test, "cpu")["accuracy"],
        "latency_ms": latency_ms(model, example, repeats=100, warmup=10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits_resnet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the solo and of the od training")
    parser.add_argument("--baseline-epochs", type=int, default=10)
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    task = create_task("digits")
    torch.manual_seed(0)
    baseline = create_model(args.model, num_classes=task.num_classes, in_channels=task.input_shape[0])
    train_phase(baseline, Phase("baseline", args.baseline_epochs), context(task, baseline, 0, 1, args.lr, args.batch_size), [])
    baseline.eval()
    for p in baseline.parameters():
        p.requires_grad_(False)
    base = measure(baseline, task)

    header = f"{'conv':<8} {'mode':<5} {'seed':>4} {'params':>7} {'MACs':>8} {'accuracy':>8} {'latency_ms':>10} {'teacher':>7}"
    print(f"# {args.model} on digits; baseline {args.baseline_epochs} epochs; E = {args.epochs} epochs; od with {args.students} students")
    print(header)
    print(
        f"{'none':<8} {'base':<5} {'-':>4} {base['params']:>7} {base['macs']:>8} {base['accuracy']:>8.4f} {base['latency_ms']:>10.3f} {'-':>7}"
    )
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for conv, groups in CONVS:
        label = conv if conv != "group" else f"group{groups}"
        for seed in args.seeds:
            for mode in ("solo", "od"):
                torch.manual_seed(seed)
                ctx = context(task, baseline, seed, args.epochs, args.lr, args.batch_size)
                model = copy.deepcopy(baseline).train()
                for p in model.parameters():
                    p.requires_grad_(True)
                teacher = float("nan")
                if mode == "solo":
                    replace_3x3_convs(model, conv, groups, skip=first_layers(model, ctx.example_input))
                    train_phase(model, Phase("solo", args.epochs), ctx, [])
                else:
                    # The pipeline's steps by hand, to measure the teacher before finalize drops it.
                    od = create_method("od", {"conv": conv, "groups": groups, "students": args.students})
                    ensemble = od.prepare(model, ctx)
                    for phase in od.phases(ctx):
                        train_phase(ensemble, phase, ctx, [od.loss])
                    teacher = task.evaluate(ensemble, DataLoader(task.test_set, batch_size=256), "cpu")["accuracy"]
                    model = od.finalize(ensemble, ctx)
                result = measure(model, task)
                result["teacher"] = teacher
                rows.setdefault((label, mode), []).append(result)
                print(
                    f"{label:<8} {mode:<5} {seed:>4} {result['params']:>7} {result['macs']:>8} {result['accuracy']:>8.4f} "
                    f"{result['latency_ms']:>10.3f} {'-' if mode == 'solo' else f'{teacher:.4f}':>7}",
                    flush=True,
                )

    print("\n# mean (std) over seeds")
    print(f"{'conv':<8} {'mode':<5} {'params':>7} {'MACs':>8} {'accuracy':>16} {'latency_ms':>10} {'teacher':>8}")
    for (label, mode), results in rows.items():
        acc = [r["accuracy"] for r in results]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        teacher = "-" if mode == "solo" else f"{statistics.mean(r['teacher'] for r in results):.4f}"
        print(
            f"{label:<8} {mode:<5} {results[0]['params']:>7} {results[0]['macs']:>8} "
            f"{statistics.mean(acc):>8.4f} ({std:.4f}) {statistics.mean(r['latency_ms'] for r in results):>10.3f} {teacher:>8}"
        )
    print(f"\n# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
