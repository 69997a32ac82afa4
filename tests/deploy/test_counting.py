"""Cost metrics: FLOP counting, parameter counting, storage size and reported costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy import (
    FlopCount,
    apply_reported_cost,
    count_flops,
    count_params,
    recurrent_macs,
    size_bytes,
)

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
    assert result == FlopCount(macs=640, flops=1280, uncounted_ops=(), bops=640 * 32 * 32)


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


# ---------------------------------------------------------------------------------------------
# Recurrent layers: G*H*(I_l + P) per time step, direction and layer (+ H*P with a projection).
# ---------------------------------------------------------------------------------------------


class _FirstOutput(nn.Module):
    """Runs a recurrent layer on ``(1, T, I)``; ``time_major`` layers get ``(T, 1, I)``."""

    def __init__(self, layer: nn.Module, time_major: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.time_major = time_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x.transpose(0, 1) if self.time_major else x)
        return out[0] if isinstance(out, tuple) else out


class _UnrolledCell(nn.Module):
    """A cell applied once per time step of ``(1, T, I)``."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return state[0] if isinstance(state, tuple) else state


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize(
    ("layer", "time_major", "steps", "macs"),
    [
        # 2 layers: 4*7*(5+7) + 4*7*(7+7) = 336 + 392 per step; the fused oneDNN kernel once counted 0.
        (nn.LSTM(5, 7, num_layers=2, batch_first=True), False, 3, 3 * (336 + 392)),
        # bidirectional, 2 layers: 2 * 3*7*(5+7) + 2 * 3*7*(14+7) = 504 + 882 per step.
        (nn.GRU(5, 7, num_layers=2, bidirectional=True, batch_first=True), False, 4, 4 * (504 + 882)),
        # time-major (batch_first=False), ReLU: 1*7*(5+7) per step.
        (nn.RNN(5, 7, nonlinearity="relu"), True, 6, 6 * 84),
        # projection to 3, 2 layers: 4*7*(5+3) + 7*3 = 245, then 4*7*(3+3) + 7*3 = 189 per step.
        (nn.LSTM(5, 7, num_layers=2, proj_size=3, batch_first=True), False, 3, 3 * (245 + 189)),
        # bidirectional with projection: 2*(4*7*(5+3)+21) + 2*(4*7*(6+3)+21) = 490 + 546 per step.
        (nn.LSTM(5, 7, num_layers=2, proj_size=3, bidirectional=True, batch_first=True), False, 2, 2 * (490 + 546)),
        # cells unrolled over the sequence: G*7*(5+7) per step.
        (nn.LSTMCell(5, 7), None, 3, 3 * 336),
        (nn.GRUCell(5, 7), None, 3, 3 * 252),
        (nn.RNNCell(5, 7), None, 5, 5 * 84),
    ],
    ids=[
        "lstm-2-layers",
        "gru-bidirectional",
        "rnn-time-major",
        "lstm-proj",
        "lstm-proj-bidirectional",
        "lstm-cell",
        "gru-cell",
        "rnn-cell",
    ],
)
def test_recurrent_layers_are_counted_by_formula(layer: nn.Module, time_major: bool | None, steps: int, macs: int) -> None:
    model = _UnrolledCell(layer) if time_major is None else _FirstOutput(layer, time_major)
    result = count_flops(model, torch.randn(1, steps, 5))
    assert (result.macs, result.flops) == (macs, 2 * macs)
    # The gates' elementwise work is left out by convention, not reported as uncounted.
    assert "mkldnn_rnn_layer" not in result.uncounted_ops and "sigmoid_" not in result.uncounted_ops


def test_recurrent_macs_scale_with_batch_and_packed_rows() -> None:
    lstm = nn.LSTM(5, 7)
    assert recurrent_macs(lstm, torch.zeros(3, 2, 5)) == 6 * 336  # (T, B, I)
    assert recurrent_macs(lstm, torch.zeros(3, 5)) == 3 * 336  # unbatched (T, I)
    packed = nn.utils.rnn.pack_sequence([torch.zeros(3, 5), torch.zeros(2, 5)])
    assert recurrent_macs(lstm, packed) == 5 * 336  # one step per row of the packed data
    assert recurrent_macs(nn.GRUCell(5, 7), torch.zeros(4, 5)) == 4 * 252
    with pytest.raises(TypeError, match="Linear"):
        recurrent_macs(nn.Linear(5, 7), torch.zeros(1, 5))


def test_recurrent_layer_plus_head_adds_up() -> None:
    model = nn.Sequential(_FirstOutput(nn.GRU(5, 7, batch_first=True)), nn.Flatten(), nn.Linear(4 * 7, 3))
    assert count_flops(model, torch.randn(1, 4, 5)).macs == 4 * 252 + 28 * 3


# ---------------------------------------------------------------------------------------------
# Cost reported by methods.
# ---------------------------------------------------------------------------------------------

_MEASURED = {"macs": 1000.0, "flops": 2000.0, "params": 50.0, "size_bytes": 200.0, "latency_ms": 1.5, "accuracy": 0.9}


def test_reported_macs_replace_the_measured_ones_which_stay_as_measured_macs() -> None:
    out = apply_reported_cost(_MEASURED, {"macs": 400})
    assert (out["macs"], out["flops"], out["measured_macs"], out["measured_flops"]) == (400.0, 800.0, 1000.0, 2000.0)
    assert out["params"] == 50.0 and "measured_params" not in out
    assert _MEASURED["macs"] == 1000.0  # the input is not changed


def test_reported_flops_set_macs_and_nothing_reported_changes_nothing() -> None:
    out = apply_reported_cost(_MEASURED, {"flops": 300.0, "latency_ms": 0.5})
    assert (out["macs"], out["flops"], out["latency_ms"], out["measured_latency_ms"]) == (150.0, 300.0, 0.5, 1.5)
    assert apply_reported_cost(_MEASURED, {}) == _MEASURED


@pytest.mark.parametrize(
    ("reported", "message"),
    [({"accuracy": 1.0}, "reported 'accuracy'"), ({"macs": -1.0}, "macs=-1.0"), ({"macs": float("nan")}, "macs=nan")],
)
def test_reported_cost_is_checked(reported: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_reported_cost(_MEASURED, reported)
