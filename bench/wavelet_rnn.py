"""Wavelet-compressed GRU gate matrices against dense and a low-rank baseline at matched parameters.

For each task and seed, three GRUs are trained from scratch the same way (Adam, cosine schedule,
same epochs and batches), like the paper's RNN experiments:

1. ``dense``: the plain ``gru`` model.
2. ``wavelet-<mode>``: the chosen gate maps replaced by ``WaveletLinear`` (the ``wavelet`` method's
   ``prepare``), trained with the wavelet loss (weight 1).
3. ``low_rank``: the same gate maps replaced by ``U V`` (two bias-free linears through rank r),
   r the smallest whose ``2 n r`` weights reach the wavelet layer's stored weights (matched
   parameters; the low-rank baseline is a module swap here, not a registered method).

Adding problem: test MSE (the variance baseline, predicting the mean, is 0.167). seq_digits:
test accuracy. The paper-size parameter counts (GRU-512 on adding) are printed from
``deploy.count_params``: 791,553 dense, 530,986 ``state``.

    python bench/wavelet_rnn.py                              # adding T=30, seq_digits; hidden 64; 3 seeds
    python bench/wavelet_rnn.py --length 60 --hidden 128 --modes state gates
    python bench/wavelet_rnn.py --length 30 60 --hidden 64 128 --modes state full   # one table for the grid

At hidden 64 and 128 (3 levels) a wavelet map stores 229 and 421 weights, so the matched rank is
2 (256 and 512 weights). Measured figures, with their commands, are in the README's ``wavelet``
entry (Methods). A wavelet GRU trains several times slower than the dense one on CPU, more so
with more maps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy import count_params  # noqa: E402
from methods import MethodContext, Phase, create_method, train_phase  # noqa: E402
from methods.wavelet import GRU_MODES, WaveletLinear, wavelet_sites  # noqa: E402
from models import create_model  # noqa: E402
from tasks import create_task  # noqa: E402


def low_rank_swap(model: nn.Module, mode: str, rank: int) -> None:
    """Replace the maps ``wavelet`` would replace by ``V`` (n -> rank) then ``U`` (rank -> n), bias-free."""
    for parent, attribute, linear in wavelet_sites(model, mode):
        n = linear.in_features
        setattr(parent, attribute, nn.Sequential(nn.Linear(n, rank, bias=False), nn.Linear(rank, n, bias=False)))


def context(task, batch_size: int, epochs: int, lr: float, seed: int) -> MethodContext:
    loader = DataLoader(task.train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(task.val_set, batch_size=500)
    return MethodContext(
        teacher=None,
        train_loader=loader,
        val_loader=val,
        task_loss=task.loss,
        evaluate=lambda model: task.evaluate(model, val, "cpu"),
        example_input=task.example_input(1),
        device=torch.device("cpu"),
        epochs=epochs,
        lr=lr,
        optimizer="adam",
        weight_decay=0.0,
        seed=seed,
        log=lambda m: None,
    )


def run(
    task, variant: str, mode: str, hidden: int, levels: int, rank: int, args: argparse.Namespace, seed: int
) -> tuple[float, int, float]:
    """(test metric, params, seconds) of one variant trained from scratch."""
    torch.manual_seed(seed)
    model = create_model("gru", **task.model_kwargs(), hidden_size=hidden)
    ctx = context(task, args.batch_size, args.epochs, args.lr, seed)
    terms = []
    if variant == "wavelet":
        method = create_method("wavelet", {"mode": mode, "levels": levels})
        model = method.prepare(model, ctx)
        terms = [method.loss]
    elif variant == "low_rank":
        low_rank_swap(model, mode, rank)
    start = time.perf_counter()
    train_phase(model, Phase(variant, args.epochs), ctx, terms)
    seconds = time.perf_counter() - start
    test = task.evaluate(model, DataLoader(task.test_set, batch_size=500), "cpu")
    return test[task.metric], count_params(model), seconds


def matched_rank(hidden: int, levels: int) -> int:
    stored = count_params(WaveletLinear(hidden, levels))
    return max(1, math.ceil(stored / (2 * hidden)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["adding", "seq_digits"], choices=["adding", "seq_digits"])
    parser.add_argument("--length", type=int, nargs="+", default=[30], help="T of the adding problem (several: one row each)")
    parser.add_argument("--train-size", type=int, default=2000, help="adding sequences per epoch")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64], help="GRU width (several: one row each)")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["state"], choices=list(GRU_MODES))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    paper = {
        mode: count_params(prepared)
        for mode, prepared in (
            (
                m,
                create_method("wavelet", {"mode": m}).prepare(
                    create_model("gru", num_classes=1, in_channels=2, hidden_size=512),
                    context(create_task("adding", length=2, train_size=2, val_size=2, test_size=2), 2, 1, 1e-3, 0),
                ),
            )
            for m in ("state", "gates", "full")
        )
    }
    dense_512 = count_params(create_model("gru", num_classes=1, in_channels=2, hidden_size=512))
    print(
        f"GRU-512 on adding, params: dense {dense_512:,}, "
        + ", ".join(f"{m} {p:,}" for m, p in paper.items())
        + " (paper: 791,553 dense, 530,986 state)",
        flush=True,
    )

    variants = [("dense", "state")] + [(v, m) for m in args.modes for v in ("wavelet", "low_rank")]
    table = []  # (task, T or "-", hidden, label, mean, stdev, params, seconds)
    for hidden in args.hidden:
        rank = matched_rank(hidden, args.levels)
        print(
            f"\nhidden {hidden}, {args.levels} levels: one wavelet map stores {count_params(WaveletLinear(hidden, args.levels))} weights, "
            f"low rank {rank} stores {2 * hidden * rank}, dense {hidden**2}",
            flush=True,
        )
        cells = [(name, length) for name in args.tasks for length in (args.length if name == "adding" else [None])]
        for name, length in cells:
            task = create_task("adding", length=length, train_size=args.train_size) if name == "adding" else create_task("seq_digits")
            print(
                f"\n{name}"
                + (f" (T={length}; predicting the mean scores mse {task.reference['mse']:.3f})" if name == "adding" else "")
                + f", hidden {hidden}, {task.metric}:",
                flush=True,
            )
            for variant, mode in variants:
                results = [run(task, variant, mode, hidden, args.levels, rank, args, seed) for seed in args.seeds]
                values = [r[0] for r in results]
                mean, spread = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
                seconds = statistics.mean(r[2] for r in results)
                label = variant if variant == "dense" else f"{variant}-{mode}"
                print(
                    f"  {label:<22} {task.metric} {mean:.4f} +- {spread:.4f}  (seeds: {', '.join(f'{v:.4f}' for v in values)})"
                    f"  params {results[0][1]:,}  train {seconds:.0f} s",
                    flush=True,
                )
                table.append(
                    (f"{name} ({task.metric})", "-" if length is None else str(length), hidden, label, mean, spread, results[0][1], seconds)
                )

    print(f"\nmean +- stdev over seeds {', '.join(map(str, args.seeds))}; train: seconds per model")
    print("| task | T | hidden | variant | metric | params | train s |")
    print("|---|---|---|---|---|---|---|")
    for task_name, length, hidden, label, mean, spread, params, seconds in table:
        print(f"| {task_name} | {length} | {hidden} | {label} | {mean:.4f} +- {spread:.4f} | {params:,} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
