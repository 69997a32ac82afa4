"""The ``slimtune`` command line.

A user error (bad space, unknown name, missing search) prints one message to stderr and exits
with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import UserError

if TYPE_CHECKING:
    from search.record import SearchRecord

__all__ = ["main"]

#: Input shape and class count that ``slimtune profile --task`` measures a model at.
PROFILE_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagenet": ((3, 224, 224), 1000),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description="Search pipelines of compression methods for the best accuracy/cost trade-offs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="run a search described by a space file")
    p.add_argument("space", help="the space YAML file, e.g. spaces/quickstart.yaml")
    p.add_argument("--name", help="name of the search (default: the space's name, made unique)")
    p.add_argument("--trials", type=int, help="number of trials (overrides budget.trials)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: output.tracking_uri, sqlite:///mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray on 127.0.0.1)")
    p.add_argument("--results-dir", help="where searches are kept (default: output.results_dir, slimtune_results)")

    p = sub.add_parser("resume", help="continue an interrupted search")
    p.add_argument("name")
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--results-dir", default="slimtune_results")

    p = sub.add_parser("pareto", help="print the Pareto front of a search")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--all", action="store_true", help="list every completed trial, not only the front")
    p.add_argument("--results-dir", default="slimtune_results")

    p = sub.add_parser("export", help="export a trial's compressed model")
    p.add_argument("name")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--run", help="MLflow run id of the trial (a unique prefix is enough)")
    group.add_argument("--pick", help="knee, max-<metric> (e.g. max-accuracy) or min-<metric> (e.g. min-macs)")
    p.add_argument("--out", required=True, help="folder to write the export to")
    p.add_argument("--results-dir", default="slimtune_results")

    p = sub.add_parser("profile", help="params, MACs, FLOPs and latency of a model")
    p.add_argument("model", help="a registered model (digits_cnn, resnet56, vgg16, ...) or any torchvision classification model")
    p.add_argument("--task", default=None, choices=sorted(PROFILE_SHAPES), help="input shape and classes to measure at")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for latency")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("methods", help="list the compression methods and their hyperparameters")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="validate a space and pre-flight each method on the model (seconds, CPU)")
    p.add_argument("space")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args) or 0
    except UserError as exc:
        print(f"slimtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimtune: interrupted; continue with `slimtune resume NAME`.", file=sys.stderr)
        return 130


def _search(args: argparse.Namespace) -> int:
    try:
        from search.runner import SearchInterrupted, run_search
    except KeyboardInterrupt:
        print("slimtune: interrupted before the search started; nothing to resume.", file=sys.stderr)
        _exit_at_once(130)
    try:
        record = run_search(args.space, name=args.name, trials=args.trials, tracking_uri=args.tracking_uri, address=args.address, results_dir=args.results_dir)
    except SearchInterrupted:
        _exit_at_once(130)
    return _exit_code(record)


def _resume(args: argparse.Namespace) -> int:
    try:
        from search.runner import SearchInterrupted, resume_search
    except KeyboardInterrupt:
        print(f"slimtune: interrupted; continue with: slimtune resume {args.name} --results-dir {args.results_dir}", file=sys.stderr)
        _exit_at_once(130)
    try:
        record = resume_search(args.name, results_dir=args.results_dir, address=args.address)
    except SearchInterrupted:
        _exit_at_once(130)
    return _exit_code(record)


def _exit_at_once(code: int) -> None:
    """End the process now, its output flushed (the search has saved everything it needs).

    After an interrupt, the interpreter's normal teardown can end the process by a signal
    (SIGSEGV in the threads Ray leaves behind; SIGINT after an import was cut short) instead of
    exiting with 130, so it is skipped.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(record: SearchRecord) -> int:
    """0 when the budget completed with at least one completed trial; 1 when every trial failed."""
    import signal

    from search.record import search_progress

    # The search has finished and said so: a Ctrl-C now has nothing left to stop, and must not
    # turn the exit status into "killed by SIGINT" while the interpreter shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    return 0 if search_progress(record).completed > 0 else 1


def _pareto(args: argparse.Namespace) -> int:
    from search.ranking import pareto_table, rank_records, search_hypervolume
    from search.record import completed_records, load_search
    from search.report import format_table, plural

    record = load_search(args.name, args.results_dir)
    records = completed_records(record)
    rank_records(record, records)
    rows = pareto_table(record, records, only_front=not args.all)
    hv = search_hypervolume(record, records)
    if args.json:
        print(json.dumps({"search": record.name, "objectives": {o.metric: o.direction for o in record.objectives}, "hypervolume": hv, "baseline": _numeric(record.baseline_metrics), "trials": rows}, indent=2))
    else:
        print(f"search '{record.name}': {plural(len(records), 'completed trial')}, hypervolume {hv:.4f}; objectives " + ", ".join(f"{o.metric} ({o.direction})" for o in record.objectives))
        print(format_table(record, rows, record.baseline_metrics))
    return 0


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _export(args: argparse.Namespace) -> int:
    import shutil

    from search.export import check_round_trip
    from search.ranking import pick_record, rank_records
    from search.record import completed_records, exported_model_dir, load_search
    from search.trial import load_task

    record = load_search(args.name, args.results_dir)
    records = completed_records(record)
    rank_records(record, records)
    if args.run:
        matches = [r for r in records if r.run_id and r.run_id.startswith(args.run)]
        if len(matches) != 1:
            known = ", ".join(r.run_id[:12] for r in records if r.run_id)
            raise UserError(f"--run {args.run}: {'no' if not matches else 'more than one'} completed trial of '{args.name}' has that run id. Run ids: {known}.")
        chosen = matches[0]
    else:
        chosen = pick_record(record, records, args.pick)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose an empty or new folder.")
    with exported_model_dir(chosen.checkpoint) as source:
        if source is None:
            raise UserError(f"the exported model of {chosen.name} is missing (checkpoint {chosen.checkpoint}); it was deleted or its storage is not reachable from here.")
        shutil.copytree(source, out, dirs_exist_ok=True)
    recipe = json.loads((out / "recipe.json").read_text())
    recipe.update({"search": record.name, "trial": chosen.name, "mlflow_run_id": chosen.run_id, "metrics": chosen.metrics})
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    task = load_task(record.space)
    diff = check_round_trip(out, task.example_input(2))
    print(f"exported {chosen.name} ({chosen.pipeline}) of '{record.name}' to {out}")
    print("  " + "  ".join(f"{m} {chosen.metrics[m]:.6g}" for m in record.space.metric_names))
    print(f"  files: {', '.join(sorted(p.name for p in out.iterdir()))}; reloaded program matches the module (max diff {diff:.2g})")
    print(f"  load with: torch.export.load('{out / 'model.pt2'}').module()")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch

    from search.measure import count_flops, count_params, latency_ms, size_bytes
    from models import create_model

    from models import list_models

    if args.task is not None:
        task = args.task
    elif args.model.startswith("digits"):
        task = "digits"
    else:
        # Our other registered models are the CIFAR ones; torchvision models are ImageNet's.
        task = "cifar10" if args.model in list_models() else "imagenet"
    shape, classes = PROFILE_SHAPES[task]
    model = create_model(args.model, num_classes=classes, in_channels=shape[0]).eval()
    flops = count_flops(model, torch.zeros(1, *shape))
    report = {
        "model": args.model,
        "task": task,
        "input_shape": list(shape),
        "params": count_params(model),
        "macs": flops.macs,
        "flops": flops.flops,
        "size_bytes": size_bytes(model),
        "latency_ms": latency_ms(model, torch.zeros(args.batch_size, *shape)),
        "latency_batch_size": args.batch_size,
        "device": "cpu",
        "uncounted_ops": list(flops.uncounted_ops),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.model} at {task} input {tuple(shape)}:")
        print(f"  params      {report['params']:,} ({report['params'] / 1e6:.3f}M)")
        print(f"  MACs        {report['macs']:,} ({report['macs'] / 1e6:.2f}M)")
        print(f"  FLOPs       {report['flops']:,} (= 2 x MACs)")
        print(f"  size        {report['size_bytes']:,} bytes")
        print(f"  latency     {report['latency_ms']:.3f} ms (median, batch {args.batch_size}, cpu)")
        print(f"  not counted {', '.join(report['uncounted_ops']) or '(none)'} (ops without a FLOP formula, e.g. elementwise)")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from methods import get_method, hyperparameters, list_methods

    listing = []
    for name in list_methods():
        cls = get_method(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        listing.append(
            {
                "name": name,
                "kind": cls.kind,
                "summary": doc,
                "needs_teacher": cls.needs_teacher,
                "needs_labels": cls.needs_labels,
                "changes_architecture": cls.changes_architecture,
                "must_be_last": cls.must_be_last,
                "hyperparameters": [
                    {"name": h.name, "type": h.type.__name__, "default": h.default, "help": h.help, "search": h.search.as_dict() if h.search else None}
                    for h in hyperparameters(cls.Config)
                ],
            }
        )
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for entry in listing:
        flags = [f for f in ("needs_teacher", "changes_architecture", "must_be_last") if entry[f]]
        if not entry["needs_labels"]:
            flags.append("label-free")
        print(f"{entry['name']}  [{entry['kind']}{', ' + ', '.join(flags) if flags else ''}]")
        print(f"    {entry['summary']}")
        for h in entry["hyperparameters"]:
            search = f"  search {json.dumps(h['search'])}" if h["search"] else ""
            print(f"    {h['name']:<22} {h['type']:<6} default {h['default']!r:<8} {h['help']}{search}")
        print()
    return 0


def _check(args: argparse.Namespace) -> int:
    from search.preflight import preflight
    from search.report import plural
    from search.space import load_space

    space = load_space(args.space)
    print(f"{args.space}: valid ({space.task} / {space.model}, {plural(len(space.methods), 'method')}, objectives {', '.join(space.metric_names)})")
    results = preflight(space, log=print)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} pre-flight checks failed; fix the space or drop those methods:", file=sys.stderr)
        for r in failed:
            print(f"  {r.label}: {r.reason}", file=sys.stderr)
        return 2
    print(f"all {len(results)} pre-flight checks passed")
    return 0


_COMMANDS = {
    "search": _search,
    "resume": _resume,
    "pareto": _pareto,
    "export": _export,
    "profile": _profile,
    "methods": _methods,
    "check": _check,
}


if __name__ == "__main__":
    sys.exit(main())
