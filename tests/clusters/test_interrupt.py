"""SIGINT and SIGKILL of the driver at every stage of a search, then `slimtune resume`: no trial lost.

After every interrupt and resume the three stores agree (the study is the source of truth; MLflow
and the run map follow it), every trial that printed `done` is in `pareto --all`, no trial is
there twice, the budget is met and the front equals Optuna's `best_trials`.

By default one search takes an interrupt at every moment in turn, resuming after each
(`test_interrupts_in_turn_then_resume_loses_nothing`): one baseline and three trials cover what
would otherwise take a search per case. `SLIMTUNE_INTERRUPT_MATRIX=full` also runs every
(moment, signal) pair on a search of its own; `SLIMTUNE_KILL_LOOP=N` adds N interrupts at seeded
random moments (`test_random_interrupts`).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from search.results.record import DUPLICATE_OF

pytestmark = pytest.mark.slow

SLIMTUNE = [sys.executable, "-m", "search.cli"]
ROOT = Path(__file__).resolve().parents[2]
BUDGET = 3

SPACE = f"""
name: intr
task: digits
model: digits_cnn
baseline: {{epochs: 3}}
training: {{batch_size: 64}}
methods:
  l1_filter: {{optional: true, params: {{ratio: {{low: 0.2, high: 0.6}}}}}}
  minmax_quant: {{optional: true, params: {{bits: {{choices: [4, 8]}}}}}}
objectives: {{accuracy: max, macs: min}}
constraints: ["accuracy_drop <= 0.5"]
budget: {{trials: {BUDGET}, concurrent: 1, epochs: 2}}
sampler: {{name: random, seed: 5}}
measure: {{latency_repeats: 2}}
"""


class Search:
    """One search folder, and the driver processes started on it (each in its own session)."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.results = tmp / "results"
        self.tracking = f"sqlite:///{tmp}/mlflow.db"
        self.space = tmp / "intr.yaml"
        self.space.write_text(SPACE)
        self.logs: list[str] = []

    def start(self, command: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"driver{len(self.logs)}.log"
        self.logs.append(str(log))
        if command == "search":
            args = ["search", str(self.space), "--tracking-uri", self.tracking, "--results-dir", str(self.results)]
        else:
            args = ["resume", "intr", "--results-dir", str(self.results)]
        with log.open("w") as out:
            driver = subprocess.Popen(
                [*SLIMTUNE, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, preexec_fn=_interruptible
            )
        return driver, log

    def runs(self) -> dict:
        try:
            return json.loads((self.results / "intr" / "runs.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def printed(self) -> str:
        return "".join(Path(p).read_text() for p in self.logs)


def _interruptible() -> None:
    """In the driver's process before it starts: SIGINT at its default, so that Python turns it into Ctrl-C.

    A process started in the background by a non-interactive shell (`nohup make test &`, a CI
    runner) inherits SIGINT ignored, and Python then leaves it ignored: the driver would never
    see the test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(driver: subprocess.Popen, log: Path, ready: Callable[[str], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready(log.read_text()):
        assert driver.poll() is None, f"the driver ended (exit {driver.returncode}) before the moment to interrupt:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def interrupt(driver: subprocess.Popen, how: str) -> int:
    """SIGKILL the driver's whole session (the machine died), or SIGINT the driver (Ctrl-C)."""
    if how == "kill":
        os.killpg(driver.pid, signal.SIGKILL)
    else:
        os.kill(driver.pid, signal.SIGINT)
    try:
        return driver.wait(timeout=300)
    finally:
        with_group_gone(driver.pid)


def with_group_gone(pgid: int) -> None:
    """Stop what is left of the driver's session (Ray's processes after a SIGINT'd driver exits)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def resume_to_the_end(search: Search) -> str:
    driver, log = search.start("resume")
    code = driver.wait(timeout=900)
    with_group_gone(driver.pid)
    assert code == 0, log.read_text()
    return log.read_text()


def check_nothing_lost(search: Search) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    printed = search.printed()
    done = set(re.findall(r"(trial_\d{3}) done \(", printed))
    pareto = subprocess.run(
        [*SLIMTUNE, "pareto", "intr", "--all", "--json", "--results-dir", str(search.results)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    rows = json.loads(pareto.stdout)["trials"]
    listed = [row["trial"] for row in rows]
    assert len(listed) == len(set(listed)), listed  # no trial twice
    assert done <= set(listed), (done, listed, printed)  # every trial that printed `done`

    study = optuna.load_study(study_name="intr", storage=f"sqlite:///{search.tmp}/optuna.db")
    states = {t.number: t.state for t in study.trials}
    complete = {f"trial_{n:03d}" for n, s in states.items() if s == optuna.trial.TrialState.COMPLETE}
    assert set(listed) == complete
    assert optuna.trial.TrialState.RUNNING not in states.values()
    lost = [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("failure_reason", "").startswith("interrupted")
    ]
    refused = [t for t in study.trials if DUPLICATE_OF in t.user_attrs]  # proposals refused before they ran
    assert len(study.trials) - len(lost) - len(refused) == BUDGET, states  # the budget is met, once
    front = sorted(int(row["trial"][-3:]) for row in rows if row["rank"] == 0 and row["feasible"])
    assert front == sorted(t.number for t in study.best_trials)

    client = MlflowClient(tracking_uri=search.results.tracking)
    children = [
        r
        for r in client.search_runs([client.get_experiment_by_name("intr").experiment_id], max_results=100)
        if r.data.tags.get("slimtune.role") == "trial"
    ]
    assert len({c.data.tags["slimtune.trial_id"] for c in children}) == len(children)  # one run per trial
    finished = {c.info.run_name for c in children if c.info.status == "FINISHED"}
    assert finished == complete, (finished, complete)  # MLflow agrees with the study
    assert all(c.info.status == "FAILED" for c in children if c.info.run_name not in complete)
    runs = search.runs()
    assert {r["name"] for r in runs.values() if r["status"] == "FINISHED"} == complete  # and so does the run map
    assert {row["run_id"] for row in rows} == {c.info.run_id for c in children if c.info.status == "FINISHED"}


def _trial_running(text: str, search: Search) -> bool:
    return any(r.get("status") == "RUNNING" and r.get("last_epoch", 0) >= 1 for r in search.runs().values())


MOMENTS: dict[str, Callable[[str, Search], bool]] = {
    "baseline": lambda text, search: "baseline epoch 1/" in text,
    "mid-trial": _trial_running,
    "between-trials": lambda text, search: " done (1/" in text,
    "close-out": lambda text, search: f" done ({BUDGET}/" in text,
}


FULL_MATRIX = os.environ.get("SLIMTUNE_INTERRUPT_MATRIX") == "full"


def check_exit(code: int, how: str, text: str, search: Search) -> None:
    """Killed: -SIGKILL. Ctrl-C: exit 130 with the command that continues, or 0 if it had finished."""
    if how == "kill":
        assert code == -signal.SIGKILL
    elif "finished:" not in text:
        assert code == 130, text
        match = re.search(rf"interrupted: (\d+) of {BUDGET} trials done; continue with: slimtune resume intr --results-dir (\S+)", text)
        assert match, text
        assert Path(match.group(2)) == search.results
        assert "Traceback" not in text, text
    else:
        assert code == 0, text  # the SIGINT came after the close-out: the search had finished


def check_epoch_saved(before: dict, search: Search, text: str) -> None:
    """After a first Ctrl-C each trial that was running reported one more epoch (its checkpoint), or finished."""
    for trial_id, run in before.items():
        if run.get("status") == "RUNNING":
            after = search.runs()[trial_id]
            assert after["status"] == "FINISHED" or after["last_epoch"] > run["last_epoch"], (run, after, text)
            assert after["status"] == "FINISHED" or "stopping: 1 running trial finishes the epoch in progress" in text, text


def fresh_epoch(search: Search) -> Callable[[str, Search], bool]:
    """A moment: a trial reported an epoch to this driver (runs.json moved past what it held at the start)."""
    start = {trial_id: run.get("last_epoch", 0) for trial_id, run in search.runs().items()}

    def ready(text: str, search: Search) -> bool:
        return any(
            run.get("status") == "RUNNING" and run.get("last_epoch", 0) > start.get(trial_id, 0) for trial_id, run in search.runs().items()
        )

    return ready


def test_interrupts_in_turn_then_resume_loses_nothing(tmp_path: Path) -> None:
    """One search, interrupted at every moment in turn and resumed after each: nothing is lost.

    Ctrl-C during the baseline; SIGKILL mid-trial; Ctrl-C mid-trial (the running trial saves the
    epoch in progress first); two quick Ctrl-Cs mid-trial (stops at once); Ctrl-C between two
    trials; SIGKILL during the close-out; then a resume to the end.
    """
    search = Search(tmp_path)
    steps: list[tuple[str, Callable[[str, Search], bool] | None, str]] = [
        ("baseline", MOMENTS["baseline"], "int"),
        ("mid-trial", None, "kill"),
        ("mid-trial", None, "int"),
        ("mid-trial", None, "int-int"),
        ("between-trials", lambda text, search: " done (" in text, "int"),
        ("close-out", MOMENTS["close-out"], "kill"),
    ]
    for number, (moment, ready, how) in enumerate(steps):
        ready = ready or fresh_epoch(search)
        driver, log = search.start("search" if number == 0 else "resume")
        wait_for(driver, log, lambda text: ready(text, search))
        before = search.runs()
        double = how == "int-int"
        if double:
            os.kill(driver.pid, signal.SIGINT)
            time.sleep(0.3)
            os.kill(driver.pid, signal.SIGINT)
            started = time.monotonic()
            code = driver.wait(timeout=120)
            print(f"second SIGINT: the driver exited {time.monotonic() - started:.1f} s later")
            with_group_gone(driver.pid)
            how = "int"
        else:
            code = interrupt(driver, how)
        text = log.read_text()
        check_exit(code, how, text, search)
        if (moment, how) == ("mid-trial", "int") and not double:
            check_epoch_saved(before, search, text)
    resume_to_the_end(search)
    check_nothing_lost(search)


@pytest.mark.skipif(not FULL_MATRIX, reason="set SLIMTUNE_INTERRUPT_MATRIX=full")
@pytest.mark.parametrize("how", ["int", "kill"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_interrupt_then_resume_loses_nothing(tmp_path: Path, moment: str, how: str) -> None:
    """One search per (moment, signal) pair: interrupted once, resumed to the end."""
    search = Search(tmp_path)
    driver, log = search.start("search")
    wait_for(driver, log, lambda text: MOMENTS[moment](text, search))
    before = search.runs()
    code = interrupt(driver, how)
    text = log.read_text()
    check_exit(code, how, text, search)
    if (moment, how) == ("mid-trial", "int"):
        check_epoch_saved(before, search, text)
    resume_to_the_end(search)
    check_nothing_lost(search)


def test_random_interrupts(tmp_path: Path) -> None:
    """SIGINT or SIGKILL at seeded random moments, resuming after each, until N were delivered."""
    kills = int(os.environ.get("SLIMTUNE_KILL_LOOP", "0"))
    if kills <= 0:
        pytest.skip("set SLIMTUNE_KILL_LOOP=N to deliver N interrupts at random moments")
    rng = random.Random(int(os.environ.get("SLIMTUNE_KILL_SEED", "0")))
    delivered, searches = 0, 0
    while delivered < kills:
        search = Search(tmp_path / f"search{searches}")
        searches += 1
        command = "search"
        while True:
            driver, log = search.start(command)
            try:
                driver.wait(timeout=rng.uniform(2.0, 45.0) if delivered < kills else 900)
            except subprocess.TimeoutExpired:
                how = rng.choice(["int", "kill"])
                code = interrupt(driver, how)
                delivered += 1
                assert code in (0, 130, -signal.SIGKILL), log.read_text()
                # Killed before the manifest was written: nothing to resume, start again.
                command = "resume" if (search.results / "intr" / "search.json").exists() else "search"
                continue
            with_group_gone(driver.pid)
            assert driver.returncode == 0, log.read_text()
            break
        check_nothing_lost(search)
    print(f"{delivered} interrupts over {searches} searches, every one resumed without loss")
