"""The ``slimtune`` command line.

A user error (bad space, unknown name, missing search) prints one message to stderr and exits
with code 2; no traceback.

Each command imports what it needs inside its own function, so that ``slimtune pareto`` and
``slimtune report`` start without torch, Ray or MLflow (``tests/search/test_record.py`` checks
it); this is the one module whose function-level imports carry no comment each.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from errors import UserError, plural

if TYPE_CHECKING:
    from search.results.record import SearchRecord
    from search.space.spec import SearchSpace

__all__ = ["main"]

#: Input shape and class count that ``slimtune profile --task`` measures a model at.
PROFILE_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagenet": ((3, 224, 224), 1000),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune", description="Search pipelines of compression methods for the best accuracy/cost trade-offs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="run a search described by a space file")
    p.add_argument("space", help="the space YAML file, e.g. spaces/quickstart.yaml")
    _add_space_overrides(p)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray on 127.0.0.1)")
    p.add_argument(
        "--warm-start", metavar="NAME", help="run the Pareto recipes of the earlier search NAME (same results folder, task and model) first"
    )

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
    p.add_argument(
        "--register", metavar="MODEL",
        help="also register the trial's model in the MLflow Model Registry as a new version of MODEL; "
        "--pick PICK sets the alias PICK on it (models:/MODEL@knee), --run sets none",
    )  # fmt: skip
    p.add_argument(
        "--compile",
        action="store_true",
        help="also compile the program ahead of time with AOTInductor into model_compiled.pt2 (needs a C++ compiler; minutes on CPU)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to compile for and to time the forms on (default cpu)")
    p.add_argument(
        "--form", action="append", choices=("program", "module", "onnx"),
        help="check and time only this form (repeatable; default all three); program alone needs none of your model's code",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=None, help="batch size of the latency figures (default: the search's measure.latency_batch_size)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads of the latency figures (default: the search's, budget.cpus_per_trial)"
    )
    p.add_argument("--results-dir", default="slimtune_results")

    p = sub.add_parser("report", help="write an interactive HTML report of a search and log it on its MLflow run")
    p.add_argument("name")
    p.add_argument("--out", help="the HTML file to write (default: <results-dir>/<name>/report.html)")
    p.add_argument("--results-dir", default="slimtune_results")

    p = sub.add_parser("replay", help="retrain an exported trial from its recipe.json and compare the metrics")
    p.add_argument("recipe", help="the recipe.json of an export (or the export folder)")
    p.add_argument("--out", required=True, help="folder to write the replayed model to (new or empty)")

    p = sub.add_parser("profile", help="params, MACs, FLOPs and latency of a model")
    p.add_argument(
        "model", help="a registered model (digits_cnn, resnet56, vgg16, edsr_small, ...) or any torchvision classification model"
    )
    p.add_argument(
        "--task",
        default=None,
        help=f"the task to measure at: {', '.join(sorted(PROFILE_SHAPES))} by input shape alone; sr: super-resolution at the LR size "
        "of the sr task's default training patch; any other registered task (adding, seq_digits, ...) is built as a search builds it",
    )
    p.add_argument(
        "--scale", type=int, default=None, help="upscaling factor of a super-resolution model, 2, 3 or 4 (default 2; --task sr only)"
    )
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option, as under the space's task.options (repeatable)",
    )
    p.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option, as under the space's model.options (repeatable)",
    )
    p.add_argument("--method", default=None, help="profile the model after this method's prepare and finalize (no training)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter of --method (repeatable)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for latency (at least 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for latency (default 1, as a trial with budget.cpus_per_trial: 1)")
    p.add_argument(
        "--form",
        choices=["program", "module"],
        default="program",
        help="program (default): export the model and time every form side by side (program model.pt2 as trials time it, module, "
        "onnx in ONNX Runtime); module: the nn.Module alone, without exporting (exporting a long recurrent network takes tens of seconds)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("methods", help="list the compression methods and their hyperparameters")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="validate a space, its storage and resources, and pre-flight each method on the model (seconds, CPU)")
    p.add_argument("space")
    _add_space_overrides(p)
    return parser


def _add_space_overrides(p: argparse.ArgumentParser) -> None:
    """The options of ``search`` and ``check`` that override the space (validated like the YAML)."""
    p.add_argument("--name", help="name of the search (default: the space's name, made unique)")
    p.add_argument("--trials", type=int, help="number of trials (overrides budget.trials)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: output.tracking_uri, sqlite:///mlflow.db)")
    p.add_argument("--results-dir", help="where searches are kept (default: output.results_dir, slimtune_results)")


def _overridden_space(args: argparse.Namespace) -> SearchSpace:
    """The space of ``args.space`` with the command line's overrides, checked like the YAML."""
    from search.space.spec import load_space

    return load_space(args.space).with_overrides(
        name=args.name, trials=args.trials, tracking_uri=args.tracking_uri, results_dir=args.results_dir
    )


def _print_warnings(space: SearchSpace) -> None:
    for warning in space.warnings:
        print(f"slimtune: warning: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args) or 0
    except UserError as exc:
        print(f"slimtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Only a search can be continued, and only under its own name (search prints its hints itself).
        hint = f"; continue with: slimtune resume {args.name} --results-dir {args.results_dir}" if args.command == "resume" else ""
        print(f"slimtune: interrupted{hint}.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output has closed it (`slimtune pareto NAME --json | head`): stop
        # quietly, as a command killed by SIGPIPE does; stdout goes nowhere so that the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _search(args: argparse.Namespace) -> int:
    try:
        from search.api import SearchInterrupted, search
    except KeyboardInterrupt:
        print("slimtune: interrupted before the search started; nothing to resume.", file=sys.stderr)
        _exit_at_once(130)
    try:
        result = search(
            args.space,
            name=args.name,
            trials=args.trials,
            tracking_uri=args.tracking_uri,
            address=args.address,
            results_dir=args.results_dir,
            warm_start=args.warm_start,
        )
    except SearchInterrupted:
        _exit_at_once(130)
    except KeyboardInterrupt:
        # run_search turns an interrupt into SearchInterrupted once its manifest is written.
        print("slimtune: interrupted before the search started; nothing to resume: run the same command again.", file=sys.stderr)
        _exit_at_once(130)
    return _exit_code(result.record)


def _resume(args: argparse.Namespace) -> int:
    try:
        from search.api import SearchInterrupted, resume
    except KeyboardInterrupt:
        print(f"slimtune: interrupted; continue with: slimtune resume {args.name} --results-dir {args.results_dir}", file=sys.stderr)
        _exit_at_once(130)
    try:
        result = resume(args.name, results_dir=args.results_dir, address=args.address)
    except SearchInterrupted:
        _exit_at_once(130)
    return _exit_code(result.record)


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

    from search.results.record import search_progress

    # The search has finished and said so: a Ctrl-C now has nothing left to stop, and must not
    # turn the exit status into "killed by SIGINT" while the interpreter shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    return 0 if search_progress(record).completed > 0 else 1


def _pareto(args: argparse.Namespace) -> int:
    from search.results.ranking import describe_reference, pareto_document, rank_records
    from search.results.record import completed_records, load_search, search_progress
    from search.results.report import format_table, plural, unfinished_lines

    record = load_search(args.name, args.results_dir)
    records = completed_records(record)
    rank_records(record, records)
    doc = pareto_document(record, records, only_front=not args.all)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"search '{record.name}': {plural(len(records), 'completed trial')}, hypervolume {doc['hypervolume']:.4f} ({describe_reference(doc['hypervolume_reference'])}); objectives "
            + ", ".join(f"{o.metric} ({o.direction})" for o in record.objectives)
        )
        for line in unfinished_lines(search_progress(record)):
            print(line)
        print(format_table(record, doc["trials"], record.baseline_metrics))
    return 0


def _export(args: argparse.Namespace) -> int:
    """``export``: :meth:`search.api.SearchResult.export` of the trial ``--run`` or ``--pick`` names."""
    from search.api import check_export_target, load
    from search.results.export import chosen_trial

    # As before reading the search: a bad option or --out is refused first.
    check_export_target(Path(args.out), args.device, args.batch_size, args.threads)
    result = load(args.name, args.results_dir)
    # The trial is chosen before anything is written: a bad --run or --pick leaves --out untouched.
    chosen = chosen_trial(result.record, result.trials, args.run, args.pick)
    result.export(
        chosen, args.out, form=tuple(args.form) if args.form else None, register=args.register, alias=args.pick,
        compile=args.compile, device=args.device, batch_size=args.batch_size, threads=args.threads,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    return 0


def _report(args: argparse.Namespace) -> int:
    # No search.driver.checks here: it imports the methods and torch, which the report does without.
    from search.results.html_report import REPORT_ARTIFACT, log_report, write_report
    from search.results.record import load_search

    record = load_search(args.name, args.results_dir)
    path = Path(args.out) if args.out else record.folder / REPORT_ARTIFACT
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give the HTML file to write, e.g. --out {path / REPORT_ARTIFACT}.")
    try:
        path = write_report(record, path)
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write it ({exc.strerror or type(exc).__name__}); choose a writable path.") from None
    log_report(record, path)
    print(f"wrote {path} (self-contained: open it in any browser, no network needed)")
    if record.parent_run_id:
        print(f"  logged on the search's MLflow run {record.parent_run_id} as {REPORT_ARTIFACT}")
    return 0


#: Metrics a replay does not compare: timings vary from run to run.
_TIMINGS = ("latency_ms", "measured_latency_ms")


def _replay(args: argparse.Namespace) -> int:
    from search.trial.body import replay
    from search.trial.recipe import read_recipe, versions

    doc = read_recipe(args.recipe)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose an empty or new folder.")
    for package, recorded in doc.get("versions", {}).items():
        installed = versions().get(package)
        if installed != recorded:
            print(
                f"slimtune: warning: the recipe was made with {package} {recorded}, this is {installed}; metrics may differ.",
                file=sys.stderr,
            )
    steps = " > ".join(step["name"] for step in doc["pipeline"]) or "(no methods)"
    source = f"{doc['trial']} of '{doc['search']}'" if "trial" in doc and "search" in doc else str(args.recipe)
    print(f"replaying {source}: {steps} on {doc['task']['name']} / {doc['model']['name']} ({doc['run']['device']})")
    baseline_metrics, metrics, same_baseline = replay(doc, out, log=lambda line: print(f"  {line}"))
    print(f"  baseline weights {'equal' if same_baseline else 'DIFFER from'} the recorded ones")
    expected = {**{f"baseline.{k}": v for k, v in doc["baseline"]["metrics"].items()}, **doc["metrics"]}
    got = {**{f"baseline.{k}": v for k, v in baseline_metrics.items()}, **metrics}
    compared, differ = 0, []
    for key, value in expected.items():
        if key.split(".")[-1] in _TIMINGS:
            continue
        compared += 1
        replayed = got.get(key)
        if isinstance(value, (int, float)) and isinstance(replayed, (int, float)):
            same = math.isclose(value, replayed, rel_tol=1e-6, abs_tol=1e-6)
        else:
            same = value == replayed
        if not same:
            differ.append(f"{key}: recorded {value!r}, replayed {replayed!r}")
    print(f"  {', '.join(f'{m} {metrics[m]:.6g}' for m in ('accuracy', 'psnr', 'macs', 'size_bytes') if m in metrics)}")
    if differ:
        print(f"{len(differ)} of {compared} metrics differ from the recipe's (latency not compared):", file=sys.stderr)
        for line in differ:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"replayed into {out}: all {compared} metrics equal the recipe's within 1e-6 (latency not compared)")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from deploy import FORMS
    from search.trial.profile import profile, profiled_model

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, but got {args.batch_size}.")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, but got {args.threads}.")
    if args.method_option and args.method is None:
        raise UserError("--method-option sets a hyperparameter of --method, but no --method was given; add --method NAME.")
    options = {kind: _options(getattr(args, f"{kind}_option"), f"--{kind}-option") for kind in ("task", "model", "method")}
    task, shape, model = profiled_model(args.model, args.task, options, PROFILE_SHAPES, scale=args.scale, method=args.method)
    figures = profile(args.model, task, shape, model, args.batch_size, args.threads, args.form)
    report = {
        "model": args.model,
        "task": task,
        "input_shape": list(shape),
        **{
            key: figures[key]
            for key in ("params", "macs", "flops", "bops", "size_bytes", "artifact_bytes", "latency_ms", "latency_form", "forms")
        },
        "latency_threads": args.threads,
        "latency_batch_size": args.batch_size,
        "device": "cpu",
        "uncounted_ops": figures["uncounted_ops"],
        "model_options": options["model"],
        "task_options": options["task"],
        "method": args.method,
        "method_options": options["method"],
    }
    if task == "sr":
        report["scale"] = model.scale
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        at = f"sr x{model.scale}" if task == "sr" else task
        described = args.model + _listed(report["model_options"])
        if args.method:
            described += f" after {args.method}{_listed(report['method_options'])}"
        print(f"{described} at {at}{_listed(report['task_options'])} input {tuple(shape)}:")
        print(f"  params      {report['params']:,} ({report['params'] / 1e6:.3f}M)")
        print(f"  MACs        {report['macs']:,} ({report['macs'] / 1e6:.2f}M)")
        print(f"  FLOPs       {report['flops']:,} (= 2 x MACs)")
        print(f"  BOPs        {report['bops']:,} (MACs x weight bits x input bits)")
        print(f"  size        {report['size_bytes']:,} bytes (parameters and buffers at their stored bits)")
        print(
            f"  latency     median of up to 20 (until stable) at batch {args.batch_size}, {plural(args.threads, 'CPU thread')}; file size:"
        )
        for form, figures in report["forms"].items():
            size = f"{figures['artifact_bytes']:>12,} bytes" if figures["artifact_bytes"] is not None else "   (not exported)"
            note = " (what a trial times by default)" if form == "program" else ""
            print(f"    {form:<8} {FORMS[form]:<10} {figures['latency_ms']:9.3f} ms {size}{note}")
        print(f"  not counted {', '.join(report['uncounted_ops']) or '(none)'} (ops without a FLOP formula, e.g. elementwise)")
    return 0


def _options(pairs: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs of a repeatable option as a mapping; each value is read as YAML (``512``, ``true``, ``[1, 2]``)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} takes KEY=VALUE, but got {pair!r}; write for example {flag} hidden_size=512.")
        try:
            options[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{flag} {pair!r}: the value is not valid YAML ({' '.join(str(exc).split())}); quote it or fix it.") from None
    return options


def _listed(options: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{key}={value}" for key, value in options.items()) + ")" if options else ""


def _methods(args: argparse.Namespace) -> int:
    from methods import get_method, hyperparameters, list_methods

    listing = []
    for name in list_methods():
        cls = get_method(name)
        # The class's own docstring: one module may hold several methods (vsd, vcd, vml).
        doc = (cls.__dict__.get("__doc__") or "").strip().partition("\n")[0]
        listing.append(
            {
                "name": name,
                "kind": cls.kind,
                "summary": doc,
                "task_kinds": list(cls.task_kinds) if cls.task_kinds is not None else None,
                "applies_to": cls.applies_to,
                "needs_teacher": cls.needs_teacher,
                "needs_labels": cls.needs_labels,
                "changes_architecture": cls.changes_architecture,
                "must_be_last": cls.must_be_last,
                "hyperparameters": [
                    {
                        "name": h.name,
                        "type": h.type_name,
                        "optional": h.optional,
                        "choices": list(h.choices) if h.choices is not None else None,
                        "default": h.default,
                        "help": h.help,
                        "search": h.search.as_dict() if h.search else None,
                        "compresses": h.compresses,
                        "budget": h.budget,
                    }
                    for h in hyperparameters(cls.Config)
                ],
            }
        )
    if args.json:
        # Tuples print as lists and str or int enum members as their values, as in a recipe.
        print(json.dumps(listing, indent=2))
        return 0
    for entry in listing:
        flags = [f for f in ("needs_teacher", "changes_architecture", "must_be_last") if entry[f]]
        if not entry["needs_labels"]:
            flags.append("label-free")
        print(f"{entry['name']}  [{entry['kind']}{', ' + ', '.join(flags) if flags else ''}]")
        print(f"    {entry['summary']}")
        print(f"    tasks: {', '.join(entry['task_kinds']) if entry['task_kinds'] else 'any'}; changes: {entry['applies_to']}")
        for h in entry["hyperparameters"]:
            typ = h["type"] + (" | null" if h["optional"] else "")
            notes = [f"one of {', '.join(map(str, h['choices']))}"] if h["choices"] else []
            if h["compresses"]:
                end = h["choices"][-1 if h["compresses"] == "high" else 0] if h["choices"] else f"the {h['compresses']} end"
                notes.append(f"compresses more at {end}")
            notes += ["a training budget"] if h["budget"] else []
            notes += [f"search {json.dumps(h['search'])}"] if h["search"] else []
            print(f"    {h['name']:<22} {typ:<12} default {json.dumps(h['default']):<8} {h['help']}" + "".join(f"; {n}" for n in notes))
        print()
    return 0


def _check(args: argparse.Namespace) -> int:
    from search.driver.checks import check_files, check_methods, check_resources, check_storage, local_resources

    space = _overridden_space(args)
    # "valid" only once every check has passed: any of them may still refuse the space.
    print(f"{args.space}: {space.task} / {space.model}, {plural(len(space.methods), 'method')}, objectives {', '.join(space.metric_names)}")
    _print_warnings(space)
    check_storage(space, space.results_dir, space.tracking_uri)
    check_files(space)
    count = check_methods(space, log=print)
    # Last, so that a space meant for a GPU cluster still gets its pre-flight on a laptop.
    check_resources(space, local_resources())
    print(f"{args.space}: valid ({'all ' if count > 1 else ''}{plural(count, 'pre-flight check')} passed)")
    return 0


_COMMANDS = {
    "search": _search,
    "resume": _resume,
    "pareto": _pareto,
    "export": _export,
    "report": _report,
    "replay": _replay,
    "profile": _profile,
    "methods": _methods,
    "check": _check,
}


def run() -> NoReturn:
    """The ``slimtune`` command (and ``python -m search.cli``): :func:`main`, then the exit.

    Python's teardown at exit runs the garbage collector over every object left: after a search,
    with torch, MLflow, Ray and their caches imported, 1.5-3 s on a 2-core machine before the
    shell prompt comes back. Those objects are frozen out of it (``gc.freeze``); the exit still
    runs the exit handlers, joins threads and closes modules and files as before.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
