"""Faults on the local Ray: the driver dies and resumes; a trial times out or runs out of memory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.results.record import DUPLICATE_OF

pytestmark = pytest.mark.slow

SLIMTUNE = [sys.executable, "-m", "search.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _space(tmp: Path, name: str, body: str, model: str = "digits_cnn") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\ntask: digits\nmodel: {model}\nmeasure: {{latency_repeats: 2}}\n" + body)
    return path


def test_driver_dies_and_resume_finishes_without_loss_or_duplicates(tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    space = _space(
        tmp_path,
        "crash",
        """
baseline: {epochs: 2}
training: {batch_size: 32}
methods:
  l1_filter: {optional: false, params: {ratio: {low: 0.2, high: 0.6}}}
objectives: {accuracy: max, macs: min}
budget: {trials: 5, concurrent: 1, epochs: 3}
sampler: {name: random, seed: 2}
""",
    )
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--results-dir", str(tmp_path / "results")]
    log = (tmp_path / "search.log").open("w")
    driver = subprocess.Popen(
        [*SLIMTUNE, "search", str(space), "--tracking-uri", tracking, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while (tmp_path / "search.log").read_text().count(" done (") < 2:
            assert driver.poll() is None, (tmp_path / "search.log").read_text()
            assert time.monotonic() < deadline, "the search did not finish two trials in time"
            time.sleep(0.5)
    finally:
        # The driver and the local Ray it started share its session: kill them all at once.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    resumed = subprocess.run([*SLIMTUNE, "resume", "crash", *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "finished: 5 completed trials" in resumed.stdout

    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{tmp_path}/optuna.db")
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 5  # the whole budget, once
    # A trial cut off before Tune saved its state ends FAILED with the reason, never RUNNING. (The
    # resumed sampler, seeded as before, proposes the first points again: those are refused as
    # duplicates before they run.)
    others = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE and DUPLICATE_OF not in t.user_attrs]
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs["failure_reason"].startswith("interrupted") for t in others)

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("crash").experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("slimtune.role") == "trial"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 5
    assert all(c.info.status == "FAILED" and c.data.tags["failure_reason"].startswith("interrupted") for c in children if c not in finished)
    assert len({c.data.tags["slimtune.trial_id"] for c in children}) == len(children)  # no trial twice
    # Optuna and MLflow agree on which trials completed.
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(c.data.tags["slimtune.trial_id"] for c in finished)
    for child in finished:  # each completed trial's history has every epoch once
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(1, 4)), steps


def _limits_space(tmp: Path, budget: str) -> Path:
    # resnet20 on large batches: many slow epochs on a CPU.
    return _space(
        tmp,
        "limits",
        f"""
baseline: {{epochs: 0}}
training: {{batch_size: 512}}
methods:
  kd: {{optional: false}}
objectives: {{accuracy: max, macs: min}}
budget: {{trials: 2, concurrent: 1, epochs: 40, max_failures: 0, {budget}}}
sampler: {{name: random, seed: 0}}
""",
        model="resnet20",
    )


def _check_failed(tmp: Path, record, expected: str, count: int) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="limits", storage=record.optuna_storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == count, [t.state for t in study.trials]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("limits").experiment_id])
    children = [r for r in runs if r.data.tags.get("slimtune.role") == "trial"]
    failed_runs = [c for c in children if c.info.status == "FAILED"]
    assert len(failed_runs) == count  # Tune, Optuna and MLflow agree
    assert all(expected in c.data.tags["failure_reason"] for c in failed_runs), [c.data.tags["failure_reason"] for c in failed_runs]


def test_time_limit_fails_the_trial_and_the_search_goes_on(tmp_path):
    from search.driver.runner import run_search

    space = _limits_space(tmp_path, "time_limit_s: 1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        record = run_search(space, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=print)
    failed_lines = [line for line in out.getvalue().splitlines() if " FAILED (" in line]
    assert len(failed_lines) == 2 and all("TrialTimeLimitError" in line for line in failed_lines), out.getvalue()
    assert "finished: 0 completed trials, 2 failed" in out.getvalue()
    assert "every trial failed; the most common reason: TrialTimeLimitError" in out.getvalue()
    _check_failed(tmp_path, record, "TrialTimeLimitError: the trial ran", 2)


def test_a_trial_killed_like_by_the_oom_killer_fails_and_the_search_goes_on(tmp_path):
    """The kernel's OOM killer ends a process with SIGKILL; so does this test, to the first trial."""
    import threading

    from search.driver.runner import run_search

    space = _limits_space(tmp_path, "time_limit_s: 600")
    runs_file = tmp_path / "results" / "limits" / "runs.json"
    killed: list[int] = []

    def kill_first_trial() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            try:
                runs = json.loads(runs_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                runs = {}
            for run in runs.values():
                if run.get("pid") and run.get("status") == "RUNNING":
                    os.kill(run["pid"], signal.SIGKILL)  # a Ray worker of the Ray this test started
                    killed.append(run["pid"])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_trial, daemon=True)
    killer.start()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        record = run_search(
            space.with_suffix(".yaml"),
            results_dir=tmp_path / "results",
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            trials=1,
            log=print,
        )
    killer.join(timeout=5)
    assert killed
    _check_failed(tmp_path, record, "died", 1)


def test_out_of_memory_errors_are_named():
    import torch

    from search.trial.body import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4194304 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
