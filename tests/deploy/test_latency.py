"""The latency timer: positive figures, the modes and thread count restored, exported programs timed."""

from __future__ import annotations

import torch
from torch import nn

from deploy import latency_ms


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
