"""Hypervolume per CPU-second of the early-stopping schedulers: fifo, asha and mo_asha.

Each seed runs ``spaces/quickstart.yaml`` three times with more epochs per trial (``--epochs``)
and the random sampler (so every scheduler is offered the same configurations in the same
order): ``fifo`` with ``--trials`` trials, ``asha`` and ``mo_asha`` with ``--more`` times as many
(a stopped trial costs less, so the same CPU buys more of them). All runs of a seed share one
results folder, so the baseline is trained once and reused (``search.driver.baselines``).

CPU time is the sum of the CPU seconds each trial's process spent on it (``cpu_s``, reported
by the trial: the projected-cost pass, training, measuring and exporting; a stopped trial up
to its last epoch), counted when the trial ends, in the order trials ended. The baseline and
the driver (Ray, Optuna, MLflow) are left out: they are the same for every scheduler.
Hypervolume is ``slimtune pareto``'s, over the trials completed so far.

Target: a scheduler reaches FIFO's final hypervolume in <= 60% of FIFO's CPU time.

    python bench/early_stopping.py --seeds 3 --trials 12 --epochs 6 --more 2 --schedulers mo_asha

The README's "Early stopping" section holds the latest figures and what they say.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEDULERS = ("fifo", "asha", "mo_asha")


def run(
    scheduler: str, seed: int, trials: int, epochs: int, folder: Path, grace: int | None, factor: int
) -> tuple[list[tuple[float, float]], float]:
    """One search; returns (cumulative trial CPU seconds, hypervolume) after each trial ended, and for fifo :func:`oracle_cpu`."""
    import optuna

    from search.driver.runner import run_search
    from search.results.ranking import rank_records, search_hypervolume
    from search.results.record import DUPLICATE_OF, completed_records

    data = yaml.safe_load((ROOT / "spaces" / "quickstart.yaml").read_text())
    data["name"] = f"{scheduler}-s{seed}"
    data["budget"].update(trials=trials, epochs=epochs, scheduler=scheduler, reduction_factor=factor)
    if grace is not None:
        data["budget"]["grace_epochs"] = grace
    data["sampler"] = {"name": "random", "seed": seed}
    space = folder / f"{data['name']}.yaml"
    space.write_text(yaml.safe_dump(data))
    with contextlib.redirect_stdout(io.StringIO()):
        record = run_search(space, results_dir=folder / "results", tracking_uri=f"sqlite:///{folder}/mlflow.db", log=lambda line: None)
    study = optuna.load_study(study_name=record.name, storage=record.optuna_storage)
    # A proposal refused as equal to an earlier trial (``duplicate_of``) was never trained.
    ended = sorted(
        (t for t in study.trials if t.state.is_finished() and DUPLICATE_OF not in t.user_attrs), key=lambda t: t.datetime_complete
    )
    completed = {r.number: r for r in completed_records(record)}
    curve, cpu, done = [], 0.0, []
    for t in ended:
        cpu += float(t.user_attrs.get("metrics", {}).get("cpu_s", 0.0))
        if t.number in completed:
            done.append(completed[t.number])
            rank_records(record, done)
        curve.append((cpu, search_hypervolume(record, done)))
    return curve, oracle_cpu(record, done, cpu) if scheduler == "fifo" else cpu


def oracle_cpu(record, done: list, total: float) -> float:
    """CPU seconds a scheduler that knew the final front would spend to reach it on these trials.

    It stops every completed trial off the final front at the first rung (``grace_epochs``,
    the trial's ``cpu_s`` logged to MLflow at that epoch) and runs the front's trials to their
    end; failed trials cost what they did. The projected-cost pass a stopped trial runs first is
    left out, so this is a lower bound for any scheduler offered these configurations: when it
    is above 60% of FIFO's CPU, only other (better) configurations can meet the target.
    """
    from mlflow.tracking import MlflowClient

    from search.results.ranking import front

    client = MlflowClient(record.tracking_uri)
    grace = record.space.budget.grace
    kept = {r.number for r in front(done)}
    saved = 0.0
    for r in done:
        at_grace = {m.step: m.value for m in client.get_metric_history(r.run_id, "cpu_s") if m.step > 0}.get(grace)
        if r.number not in kept and at_grace is not None:
            saved += r.metrics["cpu_s"] - at_grace
    return total - saved


def reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """CPU seconds at which the curve first reaches ``target`` hypervolume (None: never)."""
    return next((cpu for cpu, hv in curve if hv >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12, help="FIFO's trials")
    parser.add_argument("--more", type=float, default=2.0, help="asha and mo_asha run this many times FIFO's trials")
    parser.add_argument("--epochs", type=int, default=6, help="budget.epochs (per method's training phase)")
    parser.add_argument("--grace", type=int, default=None, help="budget.grace_epochs (default: the space's default)")
    parser.add_argument("--factor", type=int, default=2, help="budget.reduction_factor")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep each seed's results folder under this folder (default: a temporary one)"
    )
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS[1:]), choices=SCHEDULERS[1:], help="compared with fifo")
    args = parser.parse_args()

    ratios: dict[str, list[float]] = {s: [] for s in args.schedulers}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with contextlib.ExitStack() as stack:
            if args.keep is None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory())
            else:
                tmp = args.keep / f"seed{seed}"
                tmp.mkdir(parents=True, exist_ok=True)
            curves, oracles = {}, {}
            for scheduler in ["fifo", *args.schedulers]:
                trials = args.trials if scheduler == "fifo" else round(args.trials * args.more)
                curves[scheduler], oracles[scheduler] = run(scheduler, seed, trials, args.epochs, Path(tmp), args.grace, args.factor)
            fifo_cpu, fifo_hv = curves["fifo"][-1]
            print(
                f"seed {seed}: fifo {len(curves['fifo'])} trials, final hypervolume {fifo_hv:.4f} in {fifo_cpu:.1f} trial CPU-s; "
                f"an oracle stopping its trials off that front at the first rung needs {oracles['fifo']:.1f} ({oracles['fifo'] / fifo_cpu:.0%})",
                flush=True,
            )
            for scheduler in args.schedulers:
                curve = curves[scheduler]
                at = reach(curve, fifo_hv)
                within = max((hv for cpu, hv in curve if cpu <= fifo_cpu), default=0.0)
                at_target = max((hv for cpu, hv in curve if cpu <= 0.6 * fifo_cpu), default=0.0)
                reached = f"reaches it at {at:.1f} CPU-s ({at / fifo_cpu:.0%} of fifo's)" if at is not None else "never reaches it"
                print(
                    f"  {scheduler:8s} {len(curve)} trials, {curve[-1][0]:.1f} CPU-s, final hypervolume {curve[-1][1]:.4f}; {reached}; "
                    f"hypervolume within fifo's CPU {within:.4f}, within 60% of it {at_target:.4f} ({at_target / fifo_hv:.1%} of fifo's final)",
                    flush=True,
                )
                ratios[scheduler].append(at / fifo_cpu if at is not None else float("inf"))
    for scheduler, values in ratios.items():
        finite = [v for v in values if v != float("inf")]
        mean = f"{statistics.mean(finite):.0%}" if finite else "-"
        shares = ", ".join(f"{v:.0%}" if v != float("inf") else "never" for v in values)
        print(
            f"{scheduler}: CPU to reach fifo's final hypervolume, as a share of fifo's, per seed: {shares} (mean of those reached {mean}; target <= 60%)"
        )


if __name__ == "__main__":
    main()
