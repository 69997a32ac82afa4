"""Everything a search prints: its header, progress lines, the Pareto table and the hints.

A hint is printed only when the command it shows works, and with every option it needs
(``--results-dir`` when the search is not in ``./slimtune_results``, ``--address`` for a
cluster); ``slimtune resume`` and ``slimtune export`` read the tracking URI from the search.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from errors import plural
from search.results.ranking import describe_reference, front, hypervolume_reference, pareto_table, rank_records, search_hypervolume
from search.results.record import Progress, SearchRecord, TrialRecord, completed_records, pipeline_text
from search.space.objectives import COST_METRICS, epoch_key

__all__ = ["Reporter", "format_table", "format_metric", "latency_note", "results_dir_option", "unfinished_lines", "mlflow_ui", "UI_PORT"]

#: The results folder the CLI's ``resume``, ``pareto`` and ``export`` look in by default.
DEFAULT_RESULTS_DIR = "slimtune_results"


#: The port of the MLflow UI for a database store: the one ``make ui`` serves it on.
UI_PORT = 5000


def mlflow_ui(tracking_uri: str) -> tuple[str, str | None]:
    """The address of the MLflow UI that shows ``tracking_uri``, and the command that starts it.

    An MLflow server (``http(s)://``) is its own UI (no command: it runs already); a database
    store is shown by ``mlflow ui`` on 127.0.0.1 at :data:`UI_PORT`.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/"), None
    return f"http://127.0.0.1:{UI_PORT}", f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {UI_PORT}"


def results_dir_option(record: SearchRecord) -> str:
    """`` --results-dir DIR`` for a command about ``record``; ``""`` when it is in ``./slimtune_results``."""
    parent = record.folder.parent
    return "" if parent == Path(DEFAULT_RESULTS_DIR).resolve() else f" --results-dir {parent}"


def format_metric(metric: str, value: float) -> str:
    """Cost metrics in k/M units, quality metrics with four decimals."""
    if metric in COST_METRICS and metric != "latency_ms":
        if abs(value) >= 1e6:
            return f"{value / 1e6:.3f}M"
        if abs(value) >= 1e3:
            return f"{value / 1e3:.1f}k"
        return f"{value:g}"
    if abs(value) <= 1.0:
        return f"{value:.4f}"
    return f"{value:.3f}"


def _figures_text(metrics: dict[str, Any], names: list[str]) -> str:
    """``accuracy 0.9639  macs 47.9k``: those of ``names`` that ``metrics`` holds, as :func:`format_metric` writes them."""
    return "  ".join(f"{m} {format_metric(m, metrics[m])}" for m in names if isinstance(metrics.get(m), (int, float)))


def latency_note(metrics: dict[str, Any]) -> str:
    """What ``latency_ms`` timed, e.g. ``"program, batch 1, 2 CPU threads, cpu"`` ("" before slimtune recorded it)."""
    if "latency_threads" not in metrics:
        return ""
    threads = int(metrics["latency_threads"])
    return f"{metrics['latency_form']}, batch {int(metrics['latency_batch_size'])}, {plural(threads, 'CPU thread')}, {metrics['latency_device']}"


def format_table(record: SearchRecord, rows: list[dict[str, Any]], baseline: dict[str, float] | None = None) -> str:
    """The Pareto table: the baseline's row, then one row per trial of ``rows``."""
    headline = record.task_metrics[0] if record.task_metrics else record.metric_names[0]
    metrics = list(dict.fromkeys(record.metric_names + [headline, "macs", "params", "size_bytes"]))
    header = ["trial", "rank"] + metrics + ["run_id", "pipeline"]
    lines = []
    if baseline:
        lines.append(
            ["baseline", "-"] + [format_metric(m, baseline[m]) if m in baseline else "-" for m in metrics] + ["-", "(uncompressed)"]
        )
    for row in rows:
        lines.append(
            [row["trial"], str(row["rank"]) + ("" if row["feasible"] else "*")]
            + [format_metric(m, row[m]) if m in row else "-" for m in metrics]
            + [(row["run_id"] or "-")[:12], row["pipeline"]]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    note = latency_note(baseline or {})
    if "latency_ms" in metrics and note:
        out.append(f"latency_ms: the exported {note} (the baseline's and every trial's alike)")
    return "\n".join(out)


def unfinished_lines(progress: Progress) -> list[str]:
    """What became of the trials without a result: the failed ones by reason, the stopped ones.

    Called by ``slimtune pareto`` and at a search's end; ``[]`` when every trial completed.
    """
    lines = []
    if progress.failed:
        reasons = sorted(progress.reasons.items(), key=lambda item: -item[1])
        told = sum(count for _, count in reasons)
        parts = [f"{reason} ({count})" for reason, count in reasons]
        if told < progress.failed:
            parts.append(f"no reason recorded ({progress.failed - told}; see the trials' error.txt under tune/)")
        lines.append(f"{plural(progress.failed, 'failed trial')}: " + "; ".join(parts))
    if progress.stopped:
        lines.append(
            f"{plural(progress.stopped, 'trial')} stopped early by the scheduler (budget.scheduler): counted in the budget, never on the front"
        )
    return lines


def print_now(line: str) -> None:
    """``print`` that flushes: a search's log file shows each line when it happens."""
    print(line, flush=True)


class Reporter:
    """Prints a search's lines through ``log`` (:func:`print_now` by default).

    Args:
        log: Called with each line of text.
        address: The Ray cluster the search runs on (None: a local Ray), repeated in hints.
    """

    def __init__(self, log: Callable[[str], Any] = print_now, address: str | None = None) -> None:
        self.log = log
        self.address = address

    # Tune pickles the callback that holds this reporter; a restored one prints.
    def __getstate__(self) -> dict[str, Any]:
        return {"log": print_now, "address": self.address}

    def say(self, message: str) -> None:
        """One progress line, prefixed ``[slimtune]``."""
        self.log(f"[slimtune] {message}")

    # -- a search's start -----------------------------------------------------------------------

    def started(self, record: SearchRecord, task: str, model: str) -> None:
        objectives = ", ".join(f"{o.metric} ({o.direction})" for o in record.objectives)
        self.say(f"search '{record.name}': {task} / {model}, {plural(record.trials, 'trial')}, objectives {objectives}")
        self.say(f"results in {record.folder}; MLflow at {record.tracking_uri}")

    def resuming(self, record: SearchRecord, progress: Progress) -> None:
        self.say(f"resuming search '{record.name}' from {record.folder}: {progress.done} of {plural(record.trials, 'trial')} done")

    def baseline(self, record: SearchRecord, metrics: dict[str, Any]) -> None:
        shown = [*record.task_metrics[:1], "macs", "params", "size_bytes", "latency_ms"]
        note = f" ({latency_note(metrics)})" if latency_note(metrics) else ""
        self.say("baseline: " + "  ".join(f"{m} {format_metric(m, metrics[m])}" for m in shown if m in metrics) + note)

    # -- trials ---------------------------------------------------------------------------------

    def trial_done(self, record: SearchRecord, name: str, result: dict[str, Any], progress: Progress) -> None:
        """One line per finished trial: its pipeline, objectives, and the front so far."""
        records = completed_records(record)
        rank_records(record, records)
        hv = search_hypervolume(record, records)
        pipeline = pipeline_text(json.loads(result.get("recipe", "[]")))
        shown = _figures_text(result, record.metric_names)
        quality = result.get("quality", "ok")
        mark = "" if quality == "ok" else f", {quality}: never on the front"
        self.say(
            f"{name} done ({progress.done}/{record.trials}{mark})  {pipeline}  |  {shown}  |  front {len(front(records))}, hypervolume {hv:.4f}"
        )

    def trial_failed(self, record: SearchRecord, name: str, reason: str, progress: Progress) -> None:
        self.say(f"{name} FAILED ({progress.done}/{record.trials} done): {reason}")

    def trial_stopped(self, record: SearchRecord, name: str, result: dict[str, Any], progress: Progress) -> None:
        """One line per trial a scheduler stopped: its pipeline and the figures it was judged on (``result``, its last epoch's)."""
        epoch = int(result.get("epoch", 0))
        pipeline = pipeline_text(json.loads(result.get("recipe", "[]")))
        shown = _figures_text(result, [epoch_key(m, record.task_metrics) or m for m in record.metric_names])
        self.say(
            f"{name} stopped early after {plural(epoch, 'epoch')} ({progress.done}/{record.trials} done)  {pipeline}  |  {shown}  |  "
            "the scheduler ranked it below the trials it kept"
        )

    def trial_retried(self, name: str, reason: str) -> None:
        self.say(f"{name} failed ({reason}); retrying from its last checkpoint")

    # -- a search's end -------------------------------------------------------------------------

    def finished(self, record: SearchRecord, records: list[TrialRecord], progress: Progress, experiment_id: str) -> None:
        """The summary, the Pareto table and the hints that work for this search."""
        best = front(records)
        hv = search_hypervolume(record, records)
        failed = f", {progress.failed} failed" if progress.failed else ""
        failed += f", {progress.stopped} stopped early" if progress.stopped else ""
        self.log(
            f"\n[slimtune] search '{record.name}' finished: {plural(progress.completed, 'completed trial')}{failed}, "
            f"{len(best)} on the Pareto front, hypervolume {hv:.4f} ({describe_reference(hypervolume_reference(record, records))})"
        )
        self.exhausted(progress)
        if progress.completed == 0 and not progress.stopped:
            self.log(f"[slimtune] every trial failed; the most common reason: {progress.common_failure()}")
            return
        for line in unfinished_lines(progress):
            self.say(line)
        if progress.completed == 0:
            return
        self.log(format_table(record, pareto_table(record, records), record.baseline_metrics))
        ui, start = mlflow_ui(record.tracking_uri)
        # MLflow 3.x decides GenAI vs model-training pages by a UI-wide switch, not by the
        # experiment's tag; this URL opens the runs table of this search directly.
        url = f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning"
        if start:
            self.log(f"\nBrowse: {start}")
            self.log(f"        then open {url}")
        else:
            self.log(f"\nBrowse: {url}")
        if best:
            self.log(f"Export: slimtune export {record.name} --pick knee --out exports/{record.name}{results_dir_option(record)}")
        else:
            self.log("Export: no trial is feasible and Pareto-optimal; loosen the constraints to export one.")

    def exhausted(self, progress: Progress) -> None:
        """Why a search ran fewer trials than its budget, when its space ran out of new configurations."""
        if progress.exhausted and progress.done < progress.budget:
            self.say(
                f"the space is exhausted: {progress.done} of {plural(progress.budget, 'trial')} ran, and every new proposal "
                "equalled an earlier trial; for more trials, widen the ranges (or add choices) in the space, or run fewer trials"
            )

    def interrupted(self, record: SearchRecord, progress: Progress) -> None:
        """What a stopped search has done and the command that continues it."""
        address = f" --address {self.address}" if self.address else ""
        self.log(
            f"\n[slimtune] interrupted: {progress.done} of {plural(record.trials, 'trial')} done; "
            f"continue with: slimtune resume {record.name}{results_dir_option(record)}{address}"
        )
