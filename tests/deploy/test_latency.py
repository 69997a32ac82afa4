"""The latency timer: positive figures, the modes and thread count restored, exported programs timed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy import latency_ms, phase, recording_phases
from deploy._latency import MIN_LATENCY_REPEATS, median_is_stable


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_latency_is_positive_and_restores_mode() -> None:
    model = _small_cnn().train()
    ms = latency_ms(model, torch.randn(1, 3, 4, 4), repeats=3, warmup=1)
    assert isinstance(ms, float) and ms > 0
    assert model.training


def test_latency_runs_at_the_given_thread_count_and_restores_it() -> None:
    seen = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    latency_ms(Spy(), torch.zeros(1), repeats=2, warmup=1, threads=before + 1)
    assert seen == [before + 1] * 3 and torch.get_num_threads() == before


def test_latency_times_an_exported_program_which_refuses_eval() -> None:
    program = torch.export.export(_small_cnn().eval(), (torch.randn(2, 3, 4, 4),)).module()
    assert latency_ms(program, torch.randn(2, 3, 4, 4), repeats=1, warmup=0) > 0


class _Clock:
    """A fake ``time`` module for :mod:`deploy._latency`: each forward pass takes the next of ``passes`` milliseconds."""

    def __init__(self, passes) -> None:
        self.now, self.passes, self.calls = 0.0, iter(passes), 0

    def perf_counter(self) -> float:
        return self.now

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.now += next(self.passes) / 1000.0
        return x


def test_latency_stops_once_the_median_is_stable(monkeypatch) -> None:
    """A steady model is timed MIN_LATENCY_REPEATS times, not latency_repeats (it was always 20)."""
    import deploy._latency

    clock = _Clock([2.0] * 100)
    monkeypatch.setattr(deploy._latency, "time", clock)
    assert latency_ms(clock.run, torch.zeros(1), repeats=20, warmup=3) == pytest.approx(2.0)
    assert clock.calls == 3 + MIN_LATENCY_REPEATS == 8


def test_latency_times_on_up_to_repeats_while_the_median_moves(monkeypatch) -> None:
    """Passes that keep slowing down never settle: ``repeats`` stays the most timed passes."""
    import deploy._latency

    clock = _Clock([1.0 + i for i in range(100)])
    monkeypatch.setattr(deploy._latency, "time", clock)
    latency_ms(clock.run, torch.zeros(1), repeats=20, warmup=3)
    assert clock.calls == 3 + 20
    clock = _Clock([2.0] * 100)
    monkeypatch.setattr(deploy._latency, "time", clock)
    latency_ms(clock.run, torch.zeros(1), repeats=20, warmup=0, min_repeats=20)  # a fixed count, as asked
    assert clock.calls == 20


def test_the_median_is_stable_when_two_more_passes_move_it_at_most_the_tolerance() -> None:
    assert not median_is_stable([1.0, 1.0, 1.0, 1.0])  # fewer than MIN_LATENCY_REPEATS
    assert median_is_stable([1.0, 1.0, 1.0, 1.0, 1.0])
    assert median_is_stable([1.0, 5.0, 1.0, 1.01, 0.2])  # median 1.0, before the last two 1.0
    assert not median_is_stable([1.0, 1.1, 1.2, 1.3, 1.4])  # 1.2 against 1.1: 8% > 2%
    assert median_is_stable([1.0, 1.1, 1.2, 1.3, 1.4], tolerance=0.1)
    assert not median_is_stable([1.0, 1.0, 1.0, 1.0, 1.0], min_repeats=6)


def test_phases_nest_and_add_up_and_read_no_clock_when_off(monkeypatch) -> None:
    import deploy._latency

    clock = _Clock([])

    def no_clock() -> float:
        raise AssertionError("a phase read the clock while recording was off")

    monkeypatch.setattr(deploy._latency, "time", type("NoClock", (), {"perf_counter": staticmethod(no_clock)}))
    with phase("training"):
        pass
    monkeypatch.setattr(deploy._latency, "time", clock)
    with recording_phases() as phases:
        with phase("close-out"):
            clock.now += 1.0
            with phase("export"):
                clock.now += 2.0
            with phase("export"):
                clock.now += 0.5
        with phase("close-out"):
            clock.now += 0.25
    assert phases == {"close-out": 1.25, "export": 2.5}  # the outer phase leaves out the inner ones
    with phase("training"):  # recording stopped with the block
        clock.now += 1.0
    assert "training" not in phases
