"""The first Ctrl-C: the driver stops Tune once every running trial has saved an epoch and waits."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from search.trial import graceful_stop
from search.trial.graceful_stop import GracefulStop, wait_if_stopping


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from search.driver.runner import _init_ray

    _init_ray(None)
    yield
    ray.shutdown()


def _step_until_stopped(callback: GracefulStop, stopped: list[bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not stopped and time.monotonic() < deadline:
        callback.on_step_begin(0, [])
        time.sleep(0.1)


def test_a_trial_whose_last_report_came_before_the_request_still_lets_the_driver_stop(local_ray) -> None:
    """The report reached the driver, then Ctrl-C, then the trial saw the flag and waits: no hang."""
    import ray

    stopped: list[bool] = []
    lines: list[str] = []
    callback = GracefulStop(say=lines.append, stop_tune=lambda: stopped.append(True))
    trial = SimpleNamespace(trial_id="trial_a")
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"val_accuracy": 0.5})  # before the Ctrl-C
    graceful_stop._stop_requested.set()
    try:
        callback.on_step_begin(0, [])  # creates the flag
        _step_until_stopped(callback, stopped, timeout_s=1.0)
        assert not stopped, "the trial has neither reported since the request nor said it waits"

        # The trial's side: its report is done, it finds the flag and waits (a daemon thread here).
        threading.Thread(target=wait_if_stopping, args=("trial_a",), daemon=True).start()
        _step_until_stopped(callback, stopped, timeout_s=30.0)
        assert stopped == [True]
        # The driver says why no epoch was saved after the Ctrl-C: none was in progress.
        assert (
            lines[-1]
            == "1 running trial has its last checkpoint from the epoch it finished just before the Ctrl-C: no epoch was in progress"
        )
    finally:
        graceful_stop._stop_requested.clear()
        if callback.flag is not None:
            ray.kill(callback.flag)


def test_wait_if_stopping_returns_at_once_without_a_request(local_ray) -> None:
    started = time.monotonic()
    wait_if_stopping("trial_b")
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    ("running", "says"),
    [
        (1, "1 running trial finishes the epoch in progress and saves a checkpoint"),
        (2, "2 running trials finish the epoch in progress and save a checkpoint"),
    ],
)
def test_the_stopping_line_agrees_with_the_number_of_trials(local_ray, running: int, says: str) -> None:
    import ray

    lines: list[str] = []
    callback = GracefulStop(say=lines.append, stop_tune=lambda: None)
    for n in range(running):
        callback.on_trial_start(0, [], SimpleNamespace(trial_id=f"trial_{n}"))
    graceful_stop._stop_requested.set()
    try:
        callback.on_step_begin(0, [])
    finally:
        graceful_stop._stop_requested.clear()
        if callback.flag is not None:
            ray.kill(callback.flag)
    assert lines[0].startswith(f"stopping: {says} first"), lines


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigint_python_swallows_in_a_weakref_callback_is_raised_at_the_next_check(request) -> None:
    """A Ctrl-C that lands in a weakref callback (Python prints "Exception ignored" and goes on)
    still stops the search: the latch remembers it and the driver's next check raises it."""
    import signal
    import weakref

    from search.trial.graceful_stop import raise_if_interrupted, sigint_is_latched

    class Held:
        pass

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # an earlier test may have left it ignored
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    with sigint_is_latched():
        held = Held()
        weakref.finalize(held, lambda: signal.getsignal(signal.SIGINT)(signal.SIGINT, None))
        del held  # the handler raises inside the finalizer, where Python can only report it: we go on
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # the latch ends with its block: a later search starts clean
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_search_whose_ctrl_c_python_swallowed_in_the_pre_flight_stops_before_the_baseline(monkeypatch, request, tmp_path) -> None:
    """Seen in the kill loop: a Ctrl-C in a weakref callback during the pre-flight was printed as
    "Exception ignored" and the search ran to its end. The pre-flight runs while Ray starts: now
    the search stops once both are done, stops the Ray it started and writes nothing."""
    import signal
    import weakref
    from pathlib import Path

    from search.driver import runner

    def pre_flight_whose_sigint_is_swallowed(*args, **kwargs) -> None:
        class Held:
            pass

        held = Held()
        weakref.finalize(held, lambda: signal.getsignal(signal.SIGINT)(signal.SIGINT, None))
        del held

    events = []

    def went_on(*args, **kwargs):
        raise AssertionError("the search went on after the Ctrl-C")

    monkeypatch.setattr(runner, "check_before_baseline", pre_flight_whose_sigint_is_swallowed)
    monkeypatch.setattr(runner, "_init_ray", lambda *args, **kwargs: events.append("Ray started") or True)
    monkeypatch.setattr(runner, "_shutdown_ray", lambda: events.append("Ray stopped"))
    monkeypatch.setattr(runner, "check_resources", went_on)
    space = Path(__file__).resolve().parents[2] / "spaces" / "quickstart.yaml"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # an earlier test may have left it ignored
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    with pytest.raises(KeyboardInterrupt):
        runner.run_search(space, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=lambda line: None)
    assert events == ["Ray started", "Ray stopped"]
    assert not list((tmp_path / "results").rglob("search.json"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_latch_leaves_an_ignored_sigint_ignored(request) -> None:
    """A search started as a background job (SIGINT ignored) is not made interruptible by the latch."""
    import signal

    from search.trial.graceful_stop import sigint_is_latched

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    with sigint_is_latched():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
