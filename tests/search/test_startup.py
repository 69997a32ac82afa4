"""A search's start-up: the pre-flight runs while Ray starts, and Ray's workers import the trial's code as they start."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from errors import UserError
from search.driver import runner
from search.driver.runner import InThread


def _ticking(log, limit: int = 100_000) -> int:
    """Log until logging fails (a closed InThread) or ``limit`` lines; how many were logged."""
    for i in range(limit):
        log(f"tick {i}")
    return limit


def _wait_for(lines: list[str], n: int) -> None:
    event = threading.Event()
    while len(lines) < n:
        event.wait(0.01)


def test_a_call_in_a_thread_returns_its_value_and_raises_its_error_in_the_caller() -> None:
    assert InThread(sum, [1, 2, 3]).result() == 6

    def refuse() -> None:
        raise UserError("space.yaml: methods.kd: refused")

    call = InThread(refuse)
    with pytest.raises(UserError, match=r"^space.yaml: methods.kd: refused$"):
        call.result()
    with pytest.raises(UserError, match="refused"):
        call.close(raise_error=True)
    call.close()  # after an error or a Ctrl-C the caller only waits for it


def test_a_closed_call_logs_nothing_more_and_has_ended() -> None:
    lines: list[str] = []
    call = InThread(_ticking, log=lines.append)
    _wait_for(lines, 3)
    call.close()
    assert not call._thread.is_alive()
    said = len(lines)
    assert 3 <= said < 100_000, "the call went on logging after it was closed"
    assert lines[-1] == f"tick {said - 1}"
    assert len(lines) == said


def _record(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        space=SimpleNamespace(model="digits_cnn", task="digits", budget=SimpleNamespace(concurrent=1)), manifest=tmp_path / "search.json"
    )


def test_the_preflight_error_comes_first_when_ray_fails_to_start(monkeypatch, tmp_path: Path) -> None:
    def ray_fails(*args, **kwargs):
        raise RuntimeError("Ray could not start")

    def preflight_fails(log) -> None:
        log("[FAIL] l1_filter")
        raise UserError("space.yaml: 1 of 1 pre-flight check failed")

    monkeypatch.setattr(runner, "_init_ray", ray_fails)
    lines: list[str] = []
    preflight = InThread(preflight_fails, log=lines.append)
    with pytest.raises(UserError, match="pre-flight check failed"):
        runner._drive(_record(tmp_path), SimpleNamespace(), None, restore=False, preflight=preflight)
    assert lines == ["[FAIL] l1_filter"]


def test_a_ctrl_c_while_ray_starts_stops_the_preflight_and_its_lines(monkeypatch, tmp_path: Path) -> None:
    lines: list[str] = []

    def interrupted(*args, **kwargs):
        _wait_for(lines, 3)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_init_ray", interrupted)
    preflight = InThread(_ticking, log=lines.append)
    with pytest.raises(KeyboardInterrupt):
        runner._drive(_record(tmp_path), SimpleNamespace(), None, restore=False, preflight=preflight)
    assert not preflight._thread.is_alive()
    said = len(lines)
    assert said < 100_000, "the pre-flight went on after the Ctrl-C"
    assert len(lines) == said


@pytest.fixture(scope="module")
def started_ray():
    """A local Ray started as a search starts it."""
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    assert runner._init_ray(None, workers=0)
    yield
    ray.shutdown()


def _ray_workers() -> list[int]:
    """Pids of the Ray workers under this process (its raylet's children but Ray's agents)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    below, changed = {os.getpid()}, True
    while changed:
        grown = below | {pid for pid, parent in parents.items() if parent in below}
        changed, below = grown != below, grown
    workers = []
    for pid in below - {os.getpid()}:
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        name = command.split()[0] if command.strip() else ""
        # A worker is called ray::IDLE (ray::<its task>) once started, python ... default_worker.py before.
        started = name.startswith("ray::") and not name.endswith("Agent")
        starting = "default_worker.py" in command and not name.endswith("raylet")
        if started or starting:
            workers.append(pid)
    return workers


def test_a_started_ray_starts_the_workers_asked_for_not_one_per_cpu(started_ray) -> None:
    """Ray would start one worker per CPU as the driver connects, each importing torch with the
    trial's code (900 MB each): on a machine with more CPUs than trials at once, gigabytes
    unused. There the search asks for its trials at once (none in this Ray, on a machine of 2
    CPUs or more); a worker asked for later starts as usual."""
    import ray

    from search.driver._private import _worker_pid

    assert (os.cpu_count() or 1) >= 2
    event = threading.Event()
    event.wait(3.0)  # a worker per CPU would have started by now
    assert _ray_workers() == []
    assert ray.get(_worker_pid.options(num_cpus=0).remote()) in _ray_workers()


def test_the_workers_of_a_started_ray_import_the_trial_code_as_they_start(started_ray) -> None:
    import ray

    @ray.remote(num_cpus=1)
    def command_line() -> list[str]:
        import sys

        return list(sys.argv)

    argv = ray.get(command_line.remote())
    assert "--worker-preload-modules=search.trial.body" in argv, argv


class _Trainable:
    pass


def test_tune_trial_actors_share_the_environment_of_a_local_rays_workers(started_ray, monkeypatch) -> None:
    """Without a runtime env of its own a trial actor can take a worker Ray started ahead (Ray runs
    an actor with another runtime env in a new worker only); Tune's stays where the workers' differs."""
    from ray.tune.execution.class_cache import _ActorClassCache

    def runtime_env(cls) -> dict | None:
        return _ActorClassCache().get(cls)._default_options.get("runtime_env")

    assert runtime_env(_Trainable) is None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "set-after-ray-started")
    assert runtime_env(type("Other", (_Trainable,), {}))["env_vars"]["AWS_ACCESS_KEY_ID"] == "set-after-ray-started"
