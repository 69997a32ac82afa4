"""Per-trial overhead of `slimtune search` against the same trial body in a plain loop.

One recipe (l1_filter ratio 0.5 followed by kd, on digits) runs N times twice:

(a) plain: ``train_baseline`` once, then ``run_pipeline`` N times in this process;
(b) search: ``run_search`` with the same space, N trials, one at a time (Ray on 127.0.0.1,
    Optuna in SQLite, MLflow in SQLite, all inside a temporary folder that is removed).

The search's own baseline is timed from its log lines and left out of its per-trial figure.
"Steady" is the gap between the first and the last finished trial divided by N - 1: it leaves
out Ray's start, the first worker's imports and data loading, and the final Pareto/MLflow step.

    python bench/overhead.py --trials 6
    python bench/overhead.py --trials 8 --profile   # adds where the search's wall time goes

``--profile`` splits the search's wall time into phases: the driver's (Ray start, the baseline,
MLflow and Optuna storage calls) are timed here by wrapping those functions in this process;
each trial's (worker start and imports, data loading, training, its epoch reports, each part of
its close-out) are timed by the trial itself (``search.trial.body.PROFILE_ENV``,
``deploy.phase``), which appends them to a file. What is left is the driver's own work (Tune's
loop, the sampler, the final Pareto step) and its waiting; MLflow calls made while a trial runs
overlap it, so that line is a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import os
import statistics
import sys
import tempfile
import threading
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


class DriverClock:
    """Wall seconds of the driver's calls into Ray's start, the baseline, MLflow and Optuna, by wrapping them.

    A wrapped call inside another counts in the inner one only, and a call inside one of its own
    label (MLflow's client calling itself) counts once; ``trial_starts`` holds when Tune started
    each trial (when the searcher proposed it). Calls made in the driver's other threads (the
    pre-flight while Ray starts, the stores while the baseline trains) overlap the main thread's
    and count in ``beside`` instead.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.beside: dict[str, float] = {}
        self.trial_starts: dict[str, float] = {}
        self.baseline_phases: dict[str, float] = {}
        self._stacks = threading.local()  # each thread's open calls: [label, seconds of the wrapped calls inside it]
        self._undo: list[tuple[object, str, object]] = []

    @property
    def _open(self) -> list[list]:
        if not hasattr(self._stacks, "open"):
            self._stacks.open = []
        return self._stacks.open

    def _wrap(self, owner: object, name: str, label: str) -> None:
        original = inspect.getattr_static(owner, name)
        if isinstance(original, (staticmethod, classmethod, property)):
            return
        function = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self._open and self._open[-1][0] == label:
                return function(*args, **kwargs)
            self._open.append([label, 0.0])
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._open.pop()[1]
                if self._open:
                    self._open[-1][1] += elapsed
                seconds = self.seconds if threading.current_thread() is threading.main_thread() else self.beside
                seconds[label] = seconds.get(label, 0.0) + elapsed - inner

        self._undo.append((owner, name, original))
        setattr(owner, name, timed)

    @contextlib.contextmanager
    def installed(self):
        import optuna
        from mlflow.tracking import MlflowClient

        import deploy
        import search.driver.runner as runner
        from search.driver._private import SlimtuneOptunaSearch as searcher

        self._wrap(runner, "_init_ray", "Ray start and shutdown")
        self._wrap(runner, "_shutdown_ray", "Ray start and shutdown")
        self._wrap(runner, "_log_model", "MLflow writes and reads")
        self._wrap(runner, "check_before_baseline", "pre-flight checks")
        self._wrap(runner, "finish_search", "final Pareto step and report")
        for name, member in vars(MlflowClient).items():
            if not name.startswith("_") and inspect.isfunction(member):
                self._wrap(MlflowClient, name, "MLflow writes and reads")
        for name, member in vars(optuna.storages.RDBStorage).items():
            if not name.startswith("_") and inspect.isfunction(member):
                self._wrap(optuna.storages.RDBStorage, name, "Optuna storage")
        baseline = runner._baseline

        def timed_baseline(*args, **kwargs):
            start = time.perf_counter()
            with deploy.recording_phases() as phases:
                try:
                    return baseline(*args, **kwargs)
                finally:
                    self.seconds["baseline"] = self.seconds.get("baseline", 0.0) + time.perf_counter() - start
                    self.baseline_phases.update(phases)

        self._undo.append((runner, "_baseline", baseline))
        runner._baseline = timed_baseline
        # From the searcher's proposal to run_trial's first line: the worker's start (an actor, a
        # process, torch's import) as the trial waits for it.
        self._wrap(searcher, "suggest", "Optuna sampler")
        suggest = searcher.suggest

        def noted_suggest(self_, trial_id, *args, **kwargs):
            try:
                return suggest(self_, trial_id, *args, **kwargs)
            finally:
                self.trial_starts.setdefault(trial_id, time.time())

        searcher.suggest = noted_suggest
        try:
            yield self
        finally:
            for owner, name, original in reversed(self._undo):
                setattr(owner, name, original)
            self._undo.clear()


def profile_table(wall: float, clock: DriverClock, trial_lines: list[dict]) -> list[tuple[str, float]]:
    """Rows ``(phase, seconds)`` that add up to the search's wall time."""
    rows = [("Ray start and shutdown", clock.seconds.get("Ray start and shutdown", 0.0))]
    baseline = clock.seconds.get("baseline", 0.0)
    closing = sum(v for k, v in clock.baseline_phases.items() if k.startswith("close-out"))
    rows += [("baseline: training", baseline - closing), ("baseline: close-out", closing)]
    starts = [line["entered"] - clock.trial_starts[line["trial_id"]] for line in trial_lines if line["trial_id"] in clock.trial_starts]
    rows.append(("trials: worker start and imports", sum(starts)))
    names = sorted({k for line in trial_lines for k in line["phases"]}, key=_phase_order)
    for name in names:
        rows.append((f"trials: {name}", sum(line["phases"].get(name, 0.0) for line in trial_lines)))
    rows.append(("trials: rest of run_trial", sum(line["left"] - line["entered"] - sum(line["phases"].values()) for line in trial_lines)))
    rows.append(("pre-flight checks (driver)", clock.seconds.get("pre-flight checks", 0.0)))
    rows += [("MLflow writes and reads (driver)", clock.seconds.get("MLflow writes and reads", 0.0))]
    rows += [("Optuna sampler, less storage (driver)", clock.seconds.get("Optuna sampler", 0.0))]
    rows += [("Optuna storage (driver)", clock.seconds.get("Optuna storage", 0.0))]
    rows.append(("final Pareto step and report, less MLflow (driver)", clock.seconds.get("final Pareto step and report", 0.0)))
    rows.append(("driver's own work and waiting (the rest)", wall - sum(v for _, v in rows)))
    return rows


def beside_table(clock: DriverClock) -> list[tuple[str, float]]:
    """Rows ``(phase, seconds)`` of the driver's calls in its other threads, which overlap the rows of :func:`profile_table`."""
    return sorted(clock.beside.items())


_ORDER = ("data loading", "training", "epoch reports", "close-out: measuring", "close-out: export", "close-out: round-trip")
_ORDER += ("close-out: onnx", "close-out: latency", "close-out: files", "final report")


def _phase_order(name: str) -> int:
    return next((i for i, prefix in enumerate(_ORDER) if name.startswith(prefix)), len(_ORDER))


def search_run(space_path: Path, trials: int, tmp: Path, profile: bool = False) -> dict[str, float]:
    """Wall times of one `run_search`, split at its log lines (and into phases with ``profile``)."""
    from search.driver.runner import run_search
    from search.trial.body import PROFILE_ENV

    # Every line of the search (progress included) reaches `log`, with the time it was written.
    marks: list[tuple[float, str]] = []
    out = io.StringIO()
    cwd = os.getcwd()
    # MLflow puts a SQLite store's artifacts in ./mlruns of the working folder, not beside the
    # database: work inside the temporary folder so they go away with it.
    os.chdir(tmp)
    clock = DriverClock()
    phases_file = tmp / "phases.jsonl"
    if profile:
        # The local Ray's workers inherit the driver's environment: each trial times its phases.
        os.environ[PROFILE_ENV] = str(phases_file)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), clock.installed() if profile else contextlib.nullcontext():
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
        os.environ.pop(PROFILE_ENV, None)
    before_baseline = next(t for t, m in marks if m.startswith("[slimtune] results in"))
    after_baseline = next(t for t, m in marks if m.startswith("[slimtune] baseline:"))
    done = [t for t, line in marks if line.startswith("[slimtune] trial") and " done " in line]
    failed = [line for _, line in marks if " FAILED (" in line]
    if failed or len(done) != trials:
        raise RuntimeError(f"the search finished {len(done)} of {trials} trials; failures: {failed}")
    figures = {
        "total": end - start,
        "baseline": after_baseline - before_baseline,
        "trials": end - after_baseline,
        "first_done": done[0] - after_baseline,
        "steady": (done[-1] - done[0]) / (trials - 1) if trials > 1 else float("nan"),
    }
    if profile:
        lines = [json.loads(line) for line in phases_file.read_text().splitlines()]
        figures["profile"] = profile_table(end - start, clock, lines)
        figures["beside"] = beside_table(clock)
        figures["trial_wall"] = [line["left"] - line["entered"] for line in lines]
        figures["trial_close_out"] = [sum(v for k, v in line["phases"].items() if k.startswith("close-out")) for line in lines]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials in each mode (>= 2)")
    parser.add_argument("--baseline-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="budget.epochs of each trial")
    parser.add_argument("--profile", action="store_true", help="split the search's wall time into phases")
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
        search = search_run(space_path, args.trials, tmp, profile=args.profile)

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
    if args.profile:
        print()
        print(f"where the search's {search['total']:.2f} s went ({n} trials, one at a time):")
        width = max(len(label) for label, _ in search["profile"])
        for label, value in search["profile"]:
            print(f"  {label:<{width}}  {value:>7.2f} s  {100 * value / search['total']:>5.1f}%")
        if search["beside"]:
            print("overlapping those, in the driver's other threads (not in the sum):")
            for label, value in search["beside"]:
                print(f"  {label:<{width}}  {value:>7.2f} s")
        shares = [c / w for c, w in zip(search["trial_close_out"], search["trial_wall"])]
        print(
            f"close-out per trial: mean {statistics.fmean(search['trial_close_out']):.2f} s, "
            f"{100 * min(shares):.0f}-{100 * max(shares):.0f}% of the trial's wall time in run_trial (mean {100 * statistics.fmean(shares):.0f}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
