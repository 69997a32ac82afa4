"""Cost metrics: FLOP counting, parameter counting, storage size and latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.measure import FlopCount, count_flops, count_params, latency_ms, size_bytes

VIEW_LIKE = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "expand", "detach", "clone", "empty", "zeros",
    "_to_copy", "as_strided", "unsqueeze", "squeeze", "permute", "slice", "select", "flatten", "cat",
}  # fmt: skip


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


class _FourBitWeight(nn.Module):
    """A layer whose 12-element weight is stored at 4 bits; its bias at the dtype size."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 4))
        self.bias = nn.Parameter(torch.zeros(3))

    def storage_bits(self) -> dict[str, int]:
        return {"weight": 4}


def test_linear_flops() -> None:
    result = count_flops(nn.Linear(64, 10), torch.randn(1, 64))
    assert result == FlopCount(macs=640, flops=1280, uncounted_ops=())


def test_uncounted_ops_name_arithmetic_without_formula_but_not_views() -> None:
    model = _small_cnn()
    result = count_flops(model, torch.randn(1, 3, 4, 4))
    assert result.macs == 3 * 3 * 3 * 8 * 16 + 128 * 10
    assert "relu" in result.uncounted_ops
    assert list(result.uncounted_ops) == sorted(result.uncounted_ops)
    assert not VIEW_LIKE & set(result.uncounted_ops)


def test_count_flops_restores_modes_and_wants_one_sample() -> None:
    model = _small_cnn().train()
    model[1].eval()  # a frozen BN must stay frozen, the rest must go back to training
    count_flops(model, torch.randn(1, 3, 4, 4))
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(ValueError, match="batch size 1"):
        count_flops(model, torch.randn(2, 3, 4, 4))


def test_attention_is_counted_on_cpu() -> None:
    # In eval mode MultiheadAttention would take a fused fast path that has no FLOP formula.
    attention = nn.MultiheadAttention(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(1, 5, 8)
    result = count_flops(_SelfAttention(attention), x)
    projections = 5 * 8 * 3 * 8 + 5 * 8 * 8
    scores_and_mix = 2 * 5 * 5 * 8
    assert result.macs == projections + scores_and_mix
    assert torch.backends.mha.get_fastpath_enabled()


class _SelfAttention(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_count_params_counts_shared_parameters_once() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 20


def test_size_bytes_float32_linear() -> None:
    assert size_bytes(nn.Linear(4, 3)) == (12 + 3) * 4


def test_size_bytes_skips_num_batches_tracked_and_respects_dtype() -> None:
    bn = nn.BatchNorm2d(5)
    assert size_bytes(bn) == 4 * 5 * 4  # weight, bias, running mean and var
    assert size_bytes(nn.Linear(4, 3).half()) == (12 + 3) * 2


def test_size_bytes_uses_storage_bits() -> None:
    assert size_bytes(_FourBitWeight()) == 6 + 3 * 4
    assert size_bytes(nn.Sequential(_FourBitWeight(), nn.Linear(4, 3))) == 6 + 12 + 60


def test_size_bytes_rounds_up_per_tensor() -> None:
    class ThreeBits(_FourBitWeight):
        def storage_bits(self) -> dict[str, int]:
            return {"weight": 3, "bias": 3}

    # 12 * 3 = 36 bits -> 5 bytes; 3 * 3 = 9 bits -> 2 bytes.
    assert size_bytes(ThreeBits()) == 5 + 2


def test_size_bytes_rejects_unknown_storage_bits_name() -> None:
    class Typo(_FourBitWeight):
        def storage_bits(self) -> dict[str, int]:
            return {"weigth": 4}

    with pytest.raises(ValueError, match="weigth"):
        size_bytes(Typo())


def test_latency_is_positive_and_restores_mode() -> None:
    model = _small_cnn().train()
    ms = latency_ms(model, torch.randn(1, 3, 4, 4), repeats=3, warmup=1)
    assert isinstance(ms, float) and ms > 0
    assert model.training
