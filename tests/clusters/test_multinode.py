"""Searches on a real two-node Ray cluster (127.0.0.1), and what happens when a node dies."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

SPACE = """
name: {name}
task: digits
model: digits_cnn
baseline: {{epochs: 2}}
training: {{batch_size: {batch_size}, lr: 0.05}}
methods:
  l1_filter:
    optional: false
    params: {{ratio: {{low: 0.2, high: 0.6}}}}
objectives: {{accuracy: max, macs: min}}
budget: {{trials: {trials}, concurrent: 2, epochs: {epochs}, cpus_per_trial: 1, max_failures: 2}}
sampler: {{name: random, seed: 1}}
measure: {{latency_repeats: 2}}
"""


def _children(tracking_uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    return client, [r for r in runs if r.data.tags.get("slimtune.role") == "trial"]


def _search(tmp: Path, name: str, address: str, **fmt):
    from search.driver.runner import run_search

    space = tmp / f"{name}.yaml"
    space.write_text(SPACE.format(name=name, **fmt))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        record = run_search(space, results_dir=tmp / "results", tracking_uri=f"sqlite:///{tmp}/mlflow.db", address=address, log=print)
    return record, out.getvalue()


def test_trials_run_on_the_cluster_never_two_on_one_node_at_once(two_node_cluster, tmp_path):
    """Both nodes run trials, and trials that ran at the same time (their epochs' reports
    interleave) ran on different nodes, since each node has one CPU and each trial takes one.

    Trials are short (3 epochs of digits), shorter than a cold trial actor's start: with Tune's
    actor reuse the warm node's actor took every trial from the other node's starting actor, and
    one node ran all six (search.driver._tune.reuse_trial_actors).
    """
    nodes = two_node_cluster.node_ids()
    record, printed = _search(tmp_path, "spread", two_node_cluster.address, batch_size=16, trials=6, epochs=3)
    client, children = _children(f"sqlite:///{tmp_path}/mlflow.db", "spread")
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children), printed
    spans = []
    for child in children:
        (node,) = child.data.tags["nodes"].split(",")  # no node failed: each trial ran on one
        assert node in nodes, (node, nodes)
        stamps = [m.timestamp for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert len(stamps) == 3, stamps
        spans.append((min(stamps), max(stamps), node))
    for (start_a, end_a, node_a), (start_b, end_b, node_b) in itertools.combinations(spans, 2):
        if start_a < end_b and start_b < end_a:
            assert node_a != node_b, spans
    used = {node for _, _, node in spans}
    assert used == set(nodes), (used, nodes)  # both the head and the worker ran trials
    assert "training the baseline on the cluster" in printed


def test_worker_node_dies_and_its_trials_continue_on_the_other(two_node_cluster, tmp_path, cpu_held_on):
    cluster = two_node_cluster
    worker_id = next(node for node, name in cluster.node_ids().items() if name == "worker1")
    runs_file = tmp_path / "results" / "failover" / "runs.json"
    killed: dict[str, str] = {}

    def kill_worker_mid_trial() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                runs = json.loads(runs_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                runs = {}
            for trial_id, run in runs.items():
                # Mid-trial: it has checkpointed epoch 1 and has epochs left (6 in all).
                if worker_id in run.get("nodes", []) and run.get("status") == "RUNNING" and 1 <= run.get("last_epoch", 0) <= 3:
                    killed["trial_id"] = trial_id
                    cluster.nodes[1].kill()
                    return
            time.sleep(0.2)

    # The head's CPU is held until the worker dies, so the baseline and the first trial run on
    # the worker (else Tune may run every trial on the head) and the retry on the head. With the
    # trials one after another, two of them take the time three took on two nodes.
    with cpu_held_on(cluster, "head") as held:
        killer = threading.Thread(target=lambda: (kill_worker_mid_trial(), held.release()), daemon=True)
        killer.start()
        record, printed = _search(tmp_path, "failover", cluster.address, batch_size=8, trials=2, epochs=6)
        killer.join(timeout=5)
    assert killed, "no trial ran on the worker node before the search ended"

    client, children = _children(f"sqlite:///{tmp_path}/mlflow.db", "failover")
    assert len(children) == 2, [c.data.tags for c in children]  # one child run per trial, no duplicate
    assert all(c.info.status == "FINISHED" for c in children), printed
    assert "retrying from its last checkpoint" in printed
    retried = next(c for c in children if c.data.tags["slimtune.trial_id"] == killed["trial_id"])
    assert len(retried.data.tags["nodes"].split(",")) == 2  # started on the worker, finished on the head
    # The retried trial's history is continuous: every epoch once, none missing.
    steps = sorted(m.step for m in client.get_metric_history(retried.info.run_id, "val_accuracy"))
    assert steps == list(range(1, 7)), steps

    import optuna

    study = optuna.load_study(study_name="failover", storage=record.optuna_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


NODE_KILLS = int(os.environ.get("SLIMTUNE_NODE_KILL_LOOP", "0"))
NODE_KILL_TRIALS, NODE_KILL_EPOCHS = 3, 4


def _check_each_trial_once(tmp: Path, name: str, trials: int, epochs: int) -> list[str]:
    """What is wrong with a finished search's stores (empty: nothing): every trial done once.

    The Optuna study, MLflow's child runs and runs.json must name the same trials, each COMPLETE
    or FINISHED once, with every epoch in its MLflow history once and none missing.
    """
    import optuna

    problems = []
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")
    complete = {f"trial_{t.number:03d}" for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    if len(study.trials) != trials or len(complete) != trials:
        problems.append(f"study: {[(t.number, t.state.name) for t in study.trials]}, not {trials} COMPLETE trials")
    client, children = _children(f"sqlite:///{tmp}/mlflow.db", name)
    per_trial = Counter(c.data.tags["slimtune.trial_id"] for c in children)
    problems += [f"{trial_id}: {n} MLflow runs" for trial_id, n in per_trial.items() if n > 1]
    finished = {c.info.run_name for c in children if c.info.status == "FINISHED"}
    if finished != complete:
        problems.append(f"MLflow FINISHED {sorted(finished)} != study COMPLETE {sorted(complete)}")
    runs = json.loads((tmp / "results" / name / "runs.json").read_text())
    mapped = Counter(r["name"] for r in runs.values() if r["status"] == "FINISHED")
    if set(mapped) != complete or any(n > 1 for n in mapped.values()):
        problems.append(f"runs.json FINISHED {dict(mapped)} != study COMPLETE {sorted(complete)}")
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy"))
        if steps != list(range(1, epochs + 1)):
            problems.append(f"{child.info.run_name}: val_accuracy at epochs {steps}, not 1..{epochs} once each")
    return problems


@pytest.mark.skipif(NODE_KILLS <= 0, reason="set SLIMTUNE_NODE_KILL_LOOP=N to kill the worker node at N seeded random moments")
def test_worker_node_killed_at_random_moments(tmp_path, cpu_held_on):
    """The worker node dies at a seeded random moment of a search, N times (a fresh two-node
    cluster each time): the search finishes on the head, and every trial is done once.

    The head's CPU is held until the kill, so that until then the baseline and the trials run on
    the worker; the moment is drawn from 1 s after the driver starts to 1.2 times the search's
    undisturbed time on the worker alone, measured first in the same run (a moment past the end
    kills nothing and is reported as such). Prints one line per kill.
    """
    from search.driver.local_cluster import local_cluster

    rng = random.Random(int(os.environ.get("SLIMTUNE_KILL_SEED", "0")))
    undisturbed_s = 0.0
    rows, problems = [], []
    for number in range(NODE_KILLS + 1):
        tmp = tmp_path / f"run{number}"
        tmp.mkdir()
        name = f"nodekill{number}"
        space = tmp / f"{name}.yaml"
        space.write_text(SPACE.format(name=name, batch_size=16, trials=NODE_KILL_TRIALS, epochs=NODE_KILL_EPOCHS))
        log = tmp / "driver.log"
        with local_cluster(nodes=2, cpus_per_node=1) as cluster, cpu_held_on(cluster, "head") as held:
            command = [sys.executable, "-m", "search.cli", "search", str(space), "--address", cluster.address]
            command += ["--results-dir", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
            killed: dict[str, float] = {}
            moment = rng.uniform(1.0, 1.2 * undisturbed_s) if number else None

            def kill_worker(driver: subprocess.Popen, cluster=cluster, held=held, killed=killed) -> None:
                if driver.poll() is None:
                    cluster.nodes[1].kill()
                    killed["at"] = time.monotonic()
                held.release()

            with log.open("w") as out:
                driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=cluster.env, start_new_session=True)
            started = time.monotonic()
            killer = threading.Timer(moment, kill_worker, args=(driver,)) if moment else None
            try:
                if killer:
                    killer.start()
                code = driver.wait(timeout=max(900, 3 * undisturbed_s))
                wall = time.monotonic() - started
            finally:
                if killer:
                    killer.cancel()
                    killer.join()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(driver.pid, signal.SIGKILL)
        printed = log.read_text()
        assert code == 0, printed
        if moment is None:
            undisturbed_s = wall
        found = _check_each_trial_once(tmp, name, NODE_KILL_TRIALS, NODE_KILL_EPOCHS)
        problems += [f"run {number}: {p}" for p in found]
        if moment is not None and wall > 2 * undisturbed_s:
            problems.append(f"run {number}: hang, the search took {wall:.0f} s, over twice the undisturbed {undisturbed_s:.0f} s")
        retried = printed.count("retrying from its last checkpoint")
        what = (
            "undisturbed"
            if moment is None
            else (f"worker killed at {moment:.1f} s" if killed else f"no kill (moment {moment:.1f} s after the end)")
        )
        rows.append(f"run {number}: {what}, {retried} trial retries, {len(found)} problems, search {wall:.0f} s")
    print("\n" + "\n".join(rows + problems))
    assert not problems, problems
