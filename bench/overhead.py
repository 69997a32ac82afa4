"""Per-trial overhead of `slimtune search` against the same trial body in a plain loop.

One recipe (l1_filter ratio 0.5 followed by kd, on digits) runs N times twice:

(a) plain: ``train_baseline`` once, then ``run_pipeline`` N times in this process;
(b) search: ``run_search`` with the same space, N trials, one at a time (Ray on 127.0.0.1,
    Optuna in SQLite, MLflow in SQLite, all inside a temporary folder that is removed).

The search's own baseline is timed from its log lines and left out of its per-trial figure.
"Steady" is the gap between the first and the last finished trial divided by N - 1: it leaves
out Ray's start, the first worker's imports and data loading, and the final Pareto/MLflow step.

    python bench/overhead.py --trials 6
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SPACE = """
name: overhead
task: digits
model: digits_cnn
baseline: {{epochs: {baseline_epochs}}}
training: {{batch_size: 64, lr: 0.05}}
methods:
  l1_filter:
    optional: false
    params: {{ratio: 0.5}}
  kd:
    optional: false
    # A search trains a configuration once (search.driver.samplers.ask_distinct): a temperature range
    # this narrow gives each trial its own configuration at the same cost.
    params: {{temperature: {{low: 3.99, high: 4.01}}, weight: 1.0}}
objectives: {{accuracy: max, macs: min, size_bytes: min}}
budget: {{trials: {trials}, concurrent: 1, epochs: {epochs}, cpus_per_trial: 1}}
sampler: {{name: random, seed: 0}}
"""


def plain_loop(space, trials: int, tmp: Path) -> tuple[float, list[float]]:
    """Baseline seconds (driver's thread count) and seconds of each plain trial (1 thread)."""
    from search.trial.body import TrialSpec, recipe_from_config, run_pipeline, train_baseline

    threads = torch.get_num_threads()
    start = time.perf_counter()
    model, metrics = train_baseline(space, "cpu", log=lambda m: None)
    baseline_s = time.perf_counter() - start
    spec = TrialSpec(space=space, baseline_state={k: v.detach().clone() for k, v in model.state_dict().items()}, baseline_metrics=metrics)
    recipe = recipe_from_config(space, {"kd": {"temperature": 4.0}})
    # A Tune trial runs with torch.set_num_threads(cpus_per_trial); do the same here.
    torch.set_num_threads(max(1, int(space.budget.cpus_per_trial)))
    times = []
    try:
        for i in range(trials):
            start = time.perf_counter()
            run_pipeline(spec, recipe, tmp / f"plain_{i}", torch.device("cpu"), seed=space.seed)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return baseline_s, times


def search_run(space_path: Path, trials: int, tmp: Path) -> dict[str, float]:
    """Wall times of one `run_search`, split at its log lines."""
    from search.driver.runner import run_search

    # Every line of the search (progress included) reaches `log`, with the time it was written.
    marks: list[tuple[float, str]] = []
    out = io.StringIO()
    cwd = os.getcwd()
    # MLflow puts a SQLite store's artifacts in ./mlruns of the working folder, not beside the
    # database: work inside the temporary folder so they go away with it.
    os.chdir(tmp)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            run_search(
                space_path,
                trials=trials,
                results_dir=tmp / "results",
                tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                log=lambda m: marks.append((time.perf_counter(), m)),
            )
        end = time.perf_counter()
    finally:
        os.chdir(cwd)
    before_baseline = next(t for t, m in marks if m.startswith("[slimtune] results in"))
    after_baseline = next(t for t, m in marks if m.startswith("[slimtune] baseline:"))
    done = [t for t, line in marks if line.startswith("[slimtune] trial") and " done " in line]
    failed = [line for _, line in marks if " FAILED (" in line]
    if failed or len(done) != trials:
        raise RuntimeError(f"the search finished {len(done)} of {trials} trials; failures: {failed}")
    return {
        "total": end - start,
        "baseline": after_baseline - before_baseline,
        "trials": end - after_baseline,
        "first_done": done[0] - after_baseline,
        "steady": (done[-1] - done[0]) / (trials - 1) if trials > 1 else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials in each mode (>= 2)")
    parser.add_argument("--baseline-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="budget.epochs of each trial")
    args = parser.parse_args(argv)
    if args.trials < 2:
        parser.error("--trials must be at least 2 (the steady-state figure needs two finished trials)")

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from search.space.spec import load_space

    with tempfile.TemporaryDirectory(prefix="slimtune-bench-") as name:
        tmp = Path(name)
        # Ray's session files (sockets, logs) go to the temporary folder too, so nothing is left.
        os.environ["RAY_TMPDIR"] = str(tmp / "ray")
        space_path = tmp / "overhead.yaml"
        space_path.write_text(SPACE.format(baseline_epochs=args.baseline_epochs, trials=args.trials, epochs=args.epochs))
        space = load_space(space_path)
        recipe = " > ".join(f"{m.name}({', '.join(f'{k}={v}' for k, v in m.fixed.items())})" for m in space.methods)
        print(f"recipe {recipe}; digits / digits_cnn; baseline {args.baseline_epochs} epochs, {args.epochs} epochs per method phase")
        print(
            f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, driver threads {torch.get_num_threads()}, trial threads {space.budget.cpus_per_trial:g}"
        )

        plain_baseline, plain = plain_loop(space, args.trials, tmp)
        search = search_run(space_path, args.trials, tmp)

    n = args.trials
    plain_mean = statistics.fmean(plain)
    search_mean = search["trials"] / n
    rows = [
        ("all trials (Ray start, MLflow parent, final Pareto step included)", search_mean),
        ("steady state (between first and last finished trial)", search["steady"]),
    ]
    print()
    print(f"baseline: plain {plain_baseline:.2f} s, inside the search {search['baseline']:.2f} s (left out below)")
    print(f"plain trials: mean {plain_mean:.2f} s, median {statistics.median(plain):.2f} s, min {min(plain):.2f} s, max {max(plain):.2f} s")
    print(f"search: {search['total']:.2f} s in all; first trial finished {search['first_done']:.2f} s after the baseline")
    print()
    header = f"{'N':>3}  {'plain s/trial':>13}  {'search s/trial':>14}  {'overhead s/trial':>16}  {'ratio':>6}  search figure"
    print(header)
    print("-" * len(header))
    for label, value in rows:
        print(f"{n:>3}  {plain_mean:>13.2f}  {value:>14.2f}  {value - plain_mean:>16.2f}  {value / plain_mean:>6.2f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
