"""Parameter and MAC counts of the GRU/LSTM sequence models and the wavelet paper's MNIST CNN, against hand figures."""

from __future__ import annotations

import pytest
import torch

from deploy import count_flops, count_params
from errors import UserError
from models import create_model


def test_gru_512_on_the_adding_problem_has_the_papers_parameter_count() -> None:
    # 3 gates x (2 x 512 input weights + 512 biases + 512 x 512 hidden weights) + 512 + 1 head.
    model = create_model("gru", num_classes=1, in_channels=2, hidden_size=512)
    assert count_params(model) == 3 * (2 * 512 + 512 + 512 * 512) + 513 == 791_553


@pytest.mark.parametrize(("cell", "gates"), [("gru", 3), ("lstm", 4)])
def test_recurrent_macs_are_gates_times_hidden_times_inputs_per_step(cell: str, gates: int) -> None:
    steps, inputs, hidden, classes = 30, 2, 64, 1
    model = create_model(cell, num_classes=classes, in_channels=inputs, hidden_size=hidden, num_layers=2)
    per_step = gates * hidden * (inputs + hidden) + gates * hidden * (hidden + hidden)
    assert count_flops(model, torch.zeros(1, steps, inputs)).macs == steps * per_step + hidden * classes
    params = gates * (hidden * (inputs + hidden) + hidden) + gates * (hidden * 2 * hidden + hidden) + hidden + 1
    assert count_params(model) == params


def test_per_step_head_runs_at_every_step() -> None:
    model = create_model("lstm", num_classes=10, in_channels=10, hidden_size=16, per_step=True)
    assert model(torch.zeros(3, 7, 10)).shape == (3, 7, 10)
    assert count_flops(model, torch.zeros(1, 7, 10)).macs == 7 * (4 * 16 * (10 + 16) + 16 * 10)


def test_gru_step_matches_the_formula_of_cho_et_al() -> None:
    torch.manual_seed(0)
    model = create_model("gru", num_classes=2, in_channels=3, hidden_size=4)
    layer = model.layers[0]
    x = torch.randn(5, 1, 3)
    xr, xz, xn = layer.input_map(x[:, 0]).chunk(3, dim=-1)
    h0 = torch.zeros(5, 4)
    r, z = torch.sigmoid(xr + layer.hh_reset(h0)), torch.sigmoid(xz + layer.hh_update(h0))
    expected = (1 - z) * torch.tanh(xn + layer.hh_state(r * h0)) + z * h0
    assert torch.allclose(layer(x)[:, 0], expected)


def test_mnist_cnn_matches_the_papers_counts() -> None:
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    assert count_params(model) == 520 + 32_064 + 512_500 + 5_010 == 550_094
    # conv1 24x24x20x25, conv2 8x8x64x500, fc1 1024x500, fc2 500x10.
    assert count_flops(model, torch.zeros(1, 1, 28, 28)).macs == 288_000 + 2_048_000 + 512_000 + 5_000
    wide = create_model("mnist_cnn", num_classes=10, in_channels=1, fc_width=1024)
    assert tuple(wide.fc1.weight.shape) == (1024, 1024)


def test_bad_model_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="model option hidden_size must be a whole number >= 1, got 0"):
        create_model("gru", num_classes=1, in_channels=2, hidden_size=0)
