"""Search quality of each sampler: hypervolume against trials and against CPU-seconds.

For every space, sampler and seed, one search of ``--trials`` trials is simulated in this
process: the study is asked through :func:`search.driver.samplers.ask_distinct` with the search's own
duplicate check (:class:`search.driver.duplicates.EffectiveRecipes`) and define-by-run space (:class:`search.driver._tune.SpaceDefinition`) and sampler
(:func:`search.driver.samplers.make_sampler`), every trial is trained and measured for real by
:func:`search.trial.body.run_pipeline` (the code a Ray trial runs, one torch thread), and results are
told through :func:`search.driver._private.tell_metrics`. It is not a Ray search: ``--concurrent``
trials are kept running by asking that many up front and telling each when its simulated
finish time comes (start + its measured CPU-seconds), so a sampler proposes while other trials
are still unknown to it, as in ``slimtune search``. Ray, MLflow and checkpoints are left out.

Each space's baseline is trained once (the space's seed) and shared by every run. A trial's
training uses the space's seed, so a recipe gives the same metrics in every run: each trained
recipe is stored in ``OUT/SPACE/trials.jsonl`` with its CPU-seconds and a later run (or a rerun
of the bench) takes it from there, charged the CPU-seconds it cost when trained. Finished runs
are stored in ``OUT/SPACE/runs/``, so an interrupted bench continues where it stopped.

Hypervolume uses one fixed reference per space, independent of any run: every objective is
turned into a minimised one, quality as ``(baseline - value) / (baseline - floor)`` with the
floor at the baseline minus the space's ``accuracy_drop`` bound (0.10 without one), costs as
``value / baseline``; the reference point is 1.1 in every objective and only trials meeting the
space's constraints count. Regret is the hypervolume of the best front known from every run of
the space pooled, minus a run's hypervolume. The CPU-seconds axis adds up the CPU time of the
finished trials and of the sampler's asks. The report also prints (and draws) a floor for that
regret: a search that knew the space's best structure and spread its trials evenly over it
(:func:`structure_floor`).

    python bench/search_quality.py --spaces quickstart --seeds 5 --trials 64
    python bench/search_quality.py --spaces quickstart digits_gal --samplers random tpe --seeds 2 --trials 24
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.driver import samplers  # noqa: E402
from search.driver._private import tell_metrics  # noqa: E402
from search.driver._tune import SpaceDefinition  # noqa: E402
from search.driver.duplicates import EffectiveRecipes  # noqa: E402
from search.results.pareto import hypervolume  # noqa: E402
from search.results.record import DUPLICATE_OF  # noqa: E402
from search.space.spec import SAMPLERS, SearchSpace, load_space  # noqa: E402
from search.trial.body import TrialSpec, recipe_from_config, run_pipeline, train_baseline  # noqa: E402

#: Trial counts the table reports.
CHECKPOINTS = (8, 16, 24, 32, 48, 64)
REFERENCE = 1.1


def baseline_for(space: SearchSpace, folder: Path) -> TrialSpec:
    """The space's baseline, trained once and kept in ``folder``."""
    state_file, metrics_file = folder / "baseline.pt", folder / "baseline.json"
    if not state_file.is_file():
        model, metrics = train_baseline(space, "cpu", log=lambda message: None)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, state_file)
        metrics_file.write_text(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    state = torch.load(state_file, weights_only=True)
    return TrialSpec(space=space, baseline_state=state, baseline_metrics=json.loads(metrics_file.read_text()))


class TrialCache:
    """Trained recipes of one space (metrics and CPU-seconds), kept in a JSON-lines file."""

    def __init__(self, spec: TrialSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self.known: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.known[entry["recipe"]] = entry

    def run(self, recipe: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"metrics": ... or None when training failed, "cpu_s": ...}`` of ``recipe``."""
        key = json.dumps(recipe, sort_keys=True)
        if key not in self.known:
            start = time.process_time()
            try:
                with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                    metrics = run_pipeline(self.spec, recipe, Path(tmp) / "model", torch.device("cpu"), seed=self.spec.space.seed)
                metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            except Exception as exc:  # noqa: BLE001  a failing recipe is a failed trial, as in a search
                print(f"    trial failed: {recipe}: {exc}", file=sys.stderr)
                metrics = None
            entry = {"recipe": key, "metrics": metrics, "cpu_s": time.process_time() - start}
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            self.known[key] = entry
        return self.known[key]


def run_length(path: Path) -> int:
    """The trial budget of a stored run, from its name (``tpe_seed0_t64_c2.json`` -> 64)."""
    return int(path.stem.split("_t")[-1].split("_")[0])


def unflatten(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"kd/weight": 1.0}`` -> ``{"kd": {"weight": 1.0}}``, as Ray hands a trial its config."""
    config: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        method, param = name.split("/", 1)
        config.setdefault(method, {})[param] = value
    return config


def simulate(space: SearchSpace, cache: TrialCache, sampler: str, seed: int, trials: int, concurrent: int) -> list[dict[str, Any]]:
    """One search: the finished trials in the order they finished, each with its metrics, its costs
    and how many proposals equal to a tried configuration were refused before it was asked."""
    study = optuna.create_study(
        directions=["maximize" if mode == "max" else "minimize" for mode in space.modes],
        sampler=samplers.make_sampler(sampler, seed, trials),
    )
    define = SpaceDefinition(space)
    effective = EffectiveRecipes(space)  # the search's own duplicate check: what each proposal will build
    running: list[tuple[float, int, dict[str, Any]]] = []  # (finish time, number, cache entry)
    finished: list[dict[str, Any]] = []
    clock, started, exhausted, refused_before = 0.0, 0, False, 0
    while running or (started < trials and not exhausted):
        while len(running) < concurrent and started < trials and not exhausted:
            ask_start = time.process_time()
            trial = samplers.ask_distinct(study, define, key=effective)
            ask_s = time.process_time() - ask_start
            refused = sum(DUPLICATE_OF in t.user_attrs for t in study.get_trials(deepcopy=False)) - refused_before
            refused_before += refused
            if trial is None:
                exhausted = True
                break
            entry = cache.run(recipe_from_config(space, unflatten(trial.params)))
            running.append((clock + entry["cpu_s"], trial.number, {**entry, "ask_s": ask_s, "refused": refused}))
            started += 1
        if not running:
            break
        running.sort(key=lambda item: item[0])
        clock, number, entry = running.pop(0)
        complete = tell_metrics(study, number, entry["metrics"], space.metric_names, space.constraints)
        finished.append({"number": number, "complete": complete, **entry})
    return finished


def normaliser(space: SearchSpace, baseline: dict[str, float]):
    """The fixed map from a trial's metrics to minimised, baseline-relative objectives."""
    drop = next((c.bound for c in space.constraints if c.metric == "accuracy_drop" and c.op == "<="), 0.10)

    def normalise(metrics: dict[str, float]) -> list[float]:
        values = []
        for metric, mode in zip(space.metric_names, space.modes):
            if mode == "max":
                values.append((baseline[metric] - metrics[metric]) / drop)
            else:
                values.append(metrics[metric] / baseline[metric])
        return values

    return normalise


def feasible(space: SearchSpace, entry: dict[str, Any]) -> bool:
    """Whether a finished trial counts: complete, and every constraint of the space holds."""
    metrics = entry["metrics"]
    return entry["complete"] and metrics is not None and all(c.violation(metrics) == 0 for c in space.constraints)


def curves(space: SearchSpace, run: list[dict[str, Any]], normalise, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Hypervolume after each finished trial, and the CPU-seconds spent by then."""
    points: list[list[float]] = []
    hv, cpu = [], []
    spent = 0.0
    for entry in run[:trials]:
        spent += entry["cpu_s"] + entry["ask_s"]
        if feasible(space, entry):
            points.append(normalise(entry["metrics"]))
        hv.append(hypervolume(points, ["min"] * len(space.metric_names), [REFERENCE] * len(space.metric_names)))
        cpu.append(spent)
    hv += [hv[-1] if hv else 0.0] * (trials - len(hv))  # a run of an exhausted space ends early
    cpu += [cpu[-1] if cpu else 0.0] * (trials - len(cpu))
    return np.array(hv), np.array(cpu)


def structure(space: SearchSpace, recipe: str) -> str:
    """A recipe without its numeric parameters: its methods and their categorical choices (``l1_filter + minmax_quant(bits=8)``)."""
    parts = []
    for step in json.loads(recipe):
        method = next(m for m in space.methods if m.name == step["name"])
        choices = [f"{k}={v}" for k, v in sorted(step["params"].items()) if k in method.searched and method.searched[k].choices is not None]
        parts.append(step["name"] + (f"({', '.join(choices)})" if choices else ""))
    return " + ".join(parts)


def numeric_position(space: SearchSpace, recipe: str) -> np.ndarray:
    """A recipe's searched numeric parameters, each scaled to [0, 1] over its range (log ranges in log)."""
    position = []
    for step in json.loads(recipe):
        method = next(m for m in space.methods if m.name == step["name"])
        for name, rng in sorted(method.searched.items()):
            if rng.choices is None:
                low, high, value = float(rng.low), float(rng.high), float(step["params"][name])
                if rng.log:
                    low, high, value = math.log(low), math.log(high), math.log(value)
                position.append((value - low) / (high - low) if high > low else 0.0)
    return np.array(position)


def structure_floor(
    space: SearchSpace, stored: list[list[dict[str, Any]]], normalise, best: float, trials: int, draws: int = 200
) -> tuple[str, float, float]:
    """The regret of a search that knew the best structure and spread its ``trials`` evenly over it.

    The structure (:func:`structure`) is the one whose trials, taken out of the pooled runs,
    lose the most of the best pooled hypervolume. A draw picks ``trials`` points uniformly in
    that structure's numeric parameters and, for each, one of the 5 pooled trials of the
    structure nearest to it (their metrics are what training such a recipe gave). A quality
    metric that varies between recipes close together (the test split's noise) keeps this
    floor above 0: the pooled front holds the luckiest of many such recipes.

    Returns:
        The structure, and the mean and standard deviation of the regret over ``draws`` seeded draws.
    """
    directions, reference = ["min"] * len(space.metric_names), [REFERENCE] * len(space.metric_names)
    entries = {e["recipe"]: e for run in stored for e in run if e["metrics"] is not None}
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries.values():
        groups.setdefault(structure(space, entry["recipe"]), []).append(entry)
    points = {name: [normalise(e["metrics"]) for e in group if feasible(space, e)] for name, group in groups.items()}
    loss = {
        name: best - hypervolume([p for other, pts in points.items() if other != name for p in pts], directions, reference)
        for name in groups
    }
    region = max(loss, key=loss.get)
    group = groups[region]
    positions = np.stack([numeric_position(space, e["recipe"]) for e in group])
    rng = np.random.default_rng(0)
    regrets = []
    for _ in range(draws):
        picks = []
        for target in rng.uniform(size=(trials, positions.shape[1])):
            nearest = np.argsort(np.linalg.norm(positions - target, axis=1), kind="stable")[:5]
            picks.append(group[int(rng.choice(nearest))])
        regrets.append(best - hypervolume([normalise(e["metrics"]) for e in picks if feasible(space, e)], directions, reference))
    return region, float(np.mean(regrets)), float(np.std(regrets))


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(
    space: SearchSpace,
    runs: dict[str, list[tuple[int, list[dict[str, Any]]]]],
    stored: list[list[dict[str, Any]]],
    baseline: dict[str, float],
    plot_axes,
) -> None:
    """Print the table of one space and draw its curves.

    ``runs`` maps a sampler to its (trial budget, finished trials) per seed; a sampler's curves
    stop at the smallest budget among its seeds. ``stored`` is every run stored for the space
    (any sampler, seed and budget): their pooled front is the best known, whatever the table shows.
    """
    normalise = normaliser(space, baseline)
    directions, reference = ["min"] * len(space.metric_names), [REFERENCE] * len(space.metric_names)
    pooled = [normalise(e["metrics"]) for run in stored for e in run if feasible(space, e)]
    best = hypervolume(pooled, directions, reference)
    hv, cpu = {}, {}
    for name, seeds in runs.items():
        length = min(budget for budget, _ in seeds)
        pairs = [curves(space, run, normalise, length) for _, run in seeds]
        hv[name], cpu[name] = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    longest = max(len(curve[0]) for curve in hv.values())
    marks = [t for t in CHECKPOINTS if t <= longest]
    print(f"\n== {space.name}: concurrent {space.budget.concurrent}; best pooled hypervolume {best:.4f} ({len(pooled)} feasible points)")
    print("hypervolume, mean (min-max) over seeds:")
    print(f"{'sampler':<8}{'seeds':>6}" + "".join(f"{'@' + str(t):>22}" for t in marks) + f"{'CPU-s @last':>13}")
    for name in runs:
        cells = [spread(list(hv[name][:, t - 1])) if t <= hv[name].shape[1] else "-" for t in marks]
        print(f"{name:<8}{len(runs[name]):>6}" + "".join(f"{cell:>22}" for cell in cells) + f"{cpu[name][:, -1].mean():>13.0f}")
    # Runs stored before the bench counted refusals have no "refused" field: left out.
    refused = {
        name: [sum(e["refused"] for e in run) for _, run in seeds if all("refused" in e for e in run)] for name, seeds in runs.items()
    }
    print(
        "proposals equal to a running or finished trial, refused and resampled, mean per run: "
        + ", ".join(f"{name} {statistics.mean(counts):.1f} (max {max(counts)})" for name, counts in refused.items() if counts)
    )
    if "random" not in hv:
        return
    random_length = hv["random"].shape[1]
    random_final = hv["random"][:, -1].mean()
    print(
        f"regret (best pooled - hypervolume), mean (min-max), its ratio to random's, and when random's "
        f"{random_length}-trial mean hypervolume {random_final:.4f} is reached by the mean curve:"
    )
    for name in runs:
        line = f"  {name:<8}"
        for at in (24, 32):
            if at <= min(hv[name].shape[1], random_length):
                regret = best - hv[name][:, at - 1]
                ratio = regret.mean() / (best - hv["random"][:, at - 1]).mean()
                line += f" @{at} {spread(list(regret))} x{ratio:.2f} (per seed {' '.join(f'{r:.3f}' for r in regret)});"
        reached = np.nonzero(hv[name].mean(axis=0) >= random_final - 1e-12)[0]
        line += (
            f" reached at trial {reached[0] + 1} ({cpu[name].mean(axis=0)[reached[0]]:.0f} CPU-s)"
            if len(reached)
            else f" not reached in {hv[name].shape[1]} trials"
        )
        print(line)
    at = min(32, random_length)
    region, floor, floor_sd = structure_floor(space, stored, normalise, best, at)
    print(
        f"floor: a search that knew the best structure ({region}) and spread {at} trials evenly over its numeric "
        f"parameters has regret {floor:.3f} (sd {floor_sd:.3f}; x{floor / (best - hv['random'][:, at - 1]).mean():.2f} of random's @{at})"
    )
    if plot_axes is not None:
        by_trials, by_cpu = plot_axes
        for name in runs:
            mean = hv[name].mean(axis=0)
            x = np.arange(1, len(mean) + 1)
            line = by_trials.plot(x, mean, label=f"{name} ({len(runs[name])} seeds)")[0]
            by_trials.fill_between(x, hv[name].min(axis=0), hv[name].max(axis=0), color=line.get_color(), alpha=0.15)
            by_cpu.plot(cpu[name].mean(axis=0), mean, label=name, color=line.get_color())
        for axis in plot_axes:
            axis.axhline(best, color="black", linestyle=":", linewidth=1, label="best pooled")
            axis.axhline(best - floor, color="gray", linestyle="--", linewidth=1, label=f"floor @{at} (best structure, even spread)")
        by_trials.set(title=f"{space.name}: hypervolume (mean, min-max band)", xlabel="trials finished", ylabel="hypervolume")
        by_cpu.set(title=f"{space.name}: hypervolume (mean)", xlabel="CPU-seconds (trials + sampler)", ylabel="hypervolume")
        by_trials.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", nargs="+", default=["quickstart", "digits_gal"], help="space names under spaces/, or paths")
    parser.add_argument("--samplers", nargs="+", default=["random", "nsga2", "tpe", "gp"], choices=SAMPLERS)
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds 0..N-1 (the baseline and training keep the space's seed)")
    parser.add_argument(
        "--only-seeds", type=int, nargs="+", help="run and tabulate only these of the seeds (to split a bench across processes)"
    )
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=None, help="running trials (default: the space's budget.concurrent)")
    parser.add_argument("--out", type=Path, default=Path("slimtune_results/search_quality"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only tabulate the runs stored (of each sampler and seed: the run of --trials trials, else the longest)",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib is not installed: no PNG, tables only")
    figure = plt.figure(figsize=(12, 4.5 * len(args.spaces))) if plt else None

    for row, name in enumerate(args.spaces):
        path = Path(name) if name.endswith(".yaml") else ROOT / "spaces" / f"{name}.yaml"
        space = load_space(path)
        if args.concurrent is not None:
            space = space.with_overrides(concurrent=args.concurrent)
        folder = args.out / space.name
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        spec = baseline_for(space, folder)
        cache = TrialCache(spec, folder / "trials.jsonl")
        runs: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
        for sampler in args.samplers:
            for seed in range(args.seeds):
                run_file = folder / "runs" / f"{sampler}_seed{seed}_t{args.trials}_c{space.budget.concurrent}.json"
                if args.report_only:
                    # The run of --trials trials (samplers are sized for the budget), else the longest.
                    stored = sorted(folder.glob(f"runs/{sampler}_seed{seed}_t*_c{space.budget.concurrent}.json"), key=run_length)
                    if not stored:
                        continue
                    run_file = run_file if run_file.is_file() else stored[-1]
                if args.only_seeds is not None and seed not in args.only_seeds:
                    continue
                if not run_file.is_file():
                    start = time.perf_counter()
                    run = simulate(space, cache, sampler, seed, args.trials, space.budget.concurrent)
                    run_file.write_text(json.dumps(run))
                    print(
                        f"  {space.name} {sampler} seed {seed}: {len(run)} trials in {time.perf_counter() - start:.0f} s "
                        f"({len(cache.known)} recipes trained so far)",
                        flush=True,
                    )
                runs.setdefault(sampler, []).append((run_length(run_file), json.loads(run_file.read_text())))
        if not runs:
            continue
        axes = (
            (figure.add_subplot(len(args.spaces), 2, 2 * row + 1), figure.add_subplot(len(args.spaces), 2, 2 * row + 2)) if figure else None
        )
        stored = [json.loads(path.read_text()) for path in sorted(folder.glob(f"runs/*_c{space.budget.concurrent}.json"))]
        report(space, runs, stored, spec.baseline_metrics, axes)
    if figure is not None:
        figure.tight_layout()
        png = args.out / "search_quality.png"
        figure.savefig(png, dpi=110)
        print(f"\ncurves: {png}")


if __name__ == "__main__":
    main()
