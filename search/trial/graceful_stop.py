"""Ctrl-C during the trials: running trials save a fresh checkpoint before the driver stops.

The first SIGINT asks every running trial to stop at its next epoch end: the trial reports that
epoch (its checkpoint is saved with the report, as after every epoch) and then waits, without
starting the next epoch, until the driver stops Tune. A trial that Tune starts after the
request waits before it trains. Once every running trial has reported an epoch since the
request (or started after it, told the flag it waits, or ended), the driver stops Tune the way
Tune's own Ctrl-C handler does, which saves the experiment state once more, so ``slimtune
resume`` continues each trial from the epoch it had just finished. A second SIGINT stops at once
(``KeyboardInterrupt``): the trials then continue from their previous checkpoint.

Outside Tune (Ray's start, the pre-flight, the baseline) a SIGINT raises ``KeyboardInterrupt`` as
Python's own handler does, but Python cannot raise it where it lands in a weakref callback, a
fork hook or a ``__del__`` (it prints "Exception ignored" and goes on), and the search would run to
its end. :func:`sigint_is_latched` also remembers the SIGINT, and the driver's
:func:`raise_if_interrupted` between its stages raises it then.

The request travels to the trials through a small named Ray actor (:class:`StopFlag`), so it
reaches trials on every node of a cluster. A trial that waits also tells the actor so: its last
report may have reached the driver just before the request, and the driver would otherwise wait
for a report that never comes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray import tune

__all__ = [
    "STOP_FLAG_NAME",
    "GracefulStop",
    "sigint_stops_gracefully",
    "stop_requested",
    "wait_if_stopping",
    "sigint_is_latched",
    "raise_if_interrupted",
]

#: Name of the actor whose existence asks trials to stop; in the driver's namespace (each
#: driver job has its own, so two searches on one cluster do not see each other's).
STOP_FLAG_NAME = "slimtune-stop-flag"

#: How often a waiting trial wakes up (Tune ends it by killing its actor).
_WAIT_POLL_S = 5.0

#: Set by the first SIGINT while :func:`sigint_stops_gracefully` is active.
_stop_requested = threading.Event()

#: Set by a SIGINT while :func:`sigint_is_latched` is active (cleared when it starts and ends).
_sigint_arrived = threading.Event()


@ray.remote(num_cpus=0)
class StopFlag:
    """Created by the driver when the first Ctrl-C arrives: while it exists, trials stop at their next epoch end."""

    def __init__(self) -> None:
        self.waiting: set[str] = set()

    def ping(self) -> bool:
        return True

    def trial_waits(self, trial_id: str) -> None:
        """Called by a trial that has saved its epoch (or not started training) and now waits."""
        self.waiting.add(trial_id)

    def waiting_trials(self) -> list[str]:
        return sorted(self.waiting)


class GracefulStop(tune.Callback):
    """Turns the first SIGINT into "finish the epoch, checkpoint, stop" (see the module docstring).

    Tune pickles its callbacks into the experiment state and a resumed search gets this object
    back from there, so the request is a module-level event and the bookkeeping starts afresh
    whenever the object is built or unpickled.

    Args:
        say: Prints a line for the user.
        stop_tune: Ends Tune's loop the way its own Ctrl-C handler does (experiment state saved).
    """

    def __init__(self, say: Callable[[str], None], stop_tune: Callable[[], None]) -> None:
        self.say = say
        self.stop_tune = stop_tune
        self._reset()

    def _reset(self) -> None:
        self.flag = None  # the StopFlag actor, once requested
        self.triggered = False
        self.running: set[str] = set()
        self.ready: set[str] = set()
        self.saved_since: set[str] = set()  # trials that reported an epoch (or started) after the request

    def __getstate__(self) -> dict[str, Any]:
        return {"say": self.say, "stop_tune": self.stop_tune}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        if self.flag is not None:
            self.ready.add(trial.trial_id)  # it waits before it trains (``wait_if_stopping``)
            self.saved_since.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        # The epoch's checkpoint came with this result; a final result is left to complete.
        if self.flag is not None and not result.get("final"):
            self.ready.add(trial.trial_id)
            self.saved_since.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not _stop_requested.is_set() or self.triggered:
            return
        if self.flag is None:
            self.flag = StopFlag.options(name=STOP_FLAG_NAME).remote()
            ray.get(self.flag.ping.remote())
            waiting = len(self.running)
            if waiting:
                self.say(
                    f"stopping: {waiting} running trial{'' if waiting == 1 else 's'} {'finishes' if waiting == 1 else 'finish'} the epoch in progress and save{'s' if waiting == 1 else ''} a "
                    "checkpoint first (Ctrl-C again to stop now; that epoch is then redone on resume)"
                )
        if not self.running <= self.ready:
            # A trial whose last report reached us before the request waits without reporting again.
            self.ready.update(ray.get(self.flag.waiting_trials.remote()))
        if self.running <= self.ready:
            self.triggered = True
            # A trial whose report reached us just before the request had not started its next
            # epoch when it saw the flag: its last checkpoint is current, nothing was in progress.
            current = len(self.running - self.saved_since)
            if current:
                self.say(
                    f"{current} running trial{' has' if current == 1 else 's have'} its last checkpoint from the epoch "
                    "it finished just before the Ctrl-C: no epoch was in progress"
                )
            self.stop_tune()


@contextmanager
def sigint_stops_gracefully() -> Iterator[None]:
    """While Tune runs: the first SIGINT asks :class:`GracefulStop` to stop, a second raises KeyboardInterrupt.

    Tune's own SIGINT handler (which stops the trials without a last checkpoint) is switched off
    meanwhile; the handler and the environment are restored on exit.
    """
    previous_handler = signal.getsignal(signal.SIGINT)
    previous_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")

    def first_sigint(signum: int, frame: Any) -> None:
        if _stop_requested.is_set():
            # Tune's own stop (``stop_tune_run``) puts this handler back while it winds down.
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _stop_requested.set()

    _stop_requested.clear()
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, first_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if previous_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous_env


@contextmanager
def sigint_is_latched() -> Iterator[None]:
    """While a search runs outside Tune: SIGINT raises ``KeyboardInterrupt`` and is remembered for :func:`raise_if_interrupted`.

    Installed only in the main thread (the only one Python lets set a signal handler) and where
    SIGINT is not ignored (a job a script started in the background); the previous handler is
    restored on exit. :func:`sigint_stops_gracefully` replaces it while Tune runs and puts it back
    afterwards.
    """
    previous_handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous_handler is None or previous_handler == signal.SIG_IGN:
        yield
        return

    def latch(signum: int, frame: Any) -> None:
        _sigint_arrived.set()
        raise KeyboardInterrupt

    _sigint_arrived.clear()
    signal.signal(signal.SIGINT, latch)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        _sigint_arrived.clear()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a SIGINT arrived under :func:`sigint_is_latched` and was swallowed where it landed."""
    if _sigint_arrived.is_set():
        raise KeyboardInterrupt


def stop_requested() -> bool:
    """Whether a first SIGINT arrived during the last :func:`sigint_stops_gracefully`."""
    return _stop_requested.is_set()


def wait_if_stopping(trial_id: str | None = None) -> None:
    """In a trial, between epochs: when the driver asked to stop, wait here until Tune ends the trial.

    Does nothing outside a search run by the driver (no flag actor), so the trial code also
    runs in benches and tests without Tune.

    Args:
        trial_id: The waiting trial, as the driver knows it; by default Tune's context says.
    """
    try:
        flag = ray.get_actor(STOP_FLAG_NAME)
    except ValueError:
        return
    ray.get(flag.trial_waits.remote(trial_id or tune.get_context().get_trial_id()))
    while True:
        time.sleep(_WAIT_POLL_S)
