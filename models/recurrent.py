"""GRU and LSTM sequence models built from cells whose hidden-to-hidden maps are separate modules.

``torch.nn.GRU`` and ``nn.LSTM`` keep every gate's hidden-to-hidden matrix in one fused weight
run by a native kernel, so no module can stand in for one gate's matrix. Here each layer is a
:class:`GRULayer` or :class:`LSTMLayer`: one ``nn.Linear`` maps the input to every gate at once
(with the bias), and one bias-free module per gate maps the hidden state (``hh_reset``,
``hh_update``, ``hh_state`` of a GRU; ``hh_input``, ``hh_forget``, ``hh_cell``, ``hh_output`` of
an LSTM). A compression method may swap any of them for another module that maps
``(batch, hidden)`` to ``(batch, hidden)`` (the ``wavelet`` method does). The time loop runs in
Python, so the FLOP counter sees, and ``torch.export`` unrolls, every step.

The GRU follows Cho et al. (2014), as the wavelet paper's cell does: the reset gate scales the
hidden state before its map, ``n = tanh(W_n x + b_n + U_n (r * h))``; with one bias per gate a
GRU-512 on the adding problem has 791,553 parameters, the paper's figure.
"""

from __future__ import annotations

import torch
from torch import nn

from errors import UserError
from models._registry import register_model

__all__ = ["GRULayer", "LSTMLayer", "SequenceModel", "GRU_GATES", "LSTM_GATES"]

#: The hidden-to-hidden maps of a GRU layer, in the order of its input map's outputs.
GRU_GATES = ("reset", "update", "state")
#: The hidden-to-hidden maps of an LSTM layer (``cell`` is the candidate state).
LSTM_GATES = ("input", "forget", "cell", "output")


class _GatedLayer(nn.Module):
    """One recurrent layer over ``(batch, steps, in_features)``, returning ``(batch, steps, hidden)``."""

    gates: tuple[str, ...] = ()

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_map = nn.Linear(in_features, len(self.gates) * hidden_size)
        for gate in self.gates:
            setattr(self, f"hh_{gate}", nn.Linear(hidden_size, hidden_size, bias=False))


class GRULayer(_GatedLayer):
    """A GRU layer (module docstring); the hidden state starts at zero."""

    gates = GRU_GATES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.input_map(x)
        h = x.new_zeros(x.shape[0], self.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            xr, xz, xn = projected[:, t].chunk(3, dim=-1)
            r = torch.sigmoid(xr + self.hh_reset(h))
            z = torch.sigmoid(xz + self.hh_update(h))
            n = torch.tanh(xn + self.hh_state(r * h))
            h = (1 - z) * n + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class LSTMLayer(_GatedLayer):
    """An LSTM layer with input, forget and output gates; hidden and cell states start at zero."""

    gates = LSTM_GATES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.input_map(x)
        h = x.new_zeros(x.shape[0], self.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(x.shape[1]):
            xi, xf, xc, xo = projected[:, t].chunk(4, dim=-1)
            i = torch.sigmoid(xi + self.hh_input(h))
            f = torch.sigmoid(xf + self.hh_forget(h))
            g = torch.tanh(xc + self.hh_cell(h))
            o = torch.sigmoid(xo + self.hh_output(h))
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class SequenceModel(nn.Module):
    """Stacked recurrent layers and a linear head on the last step or on every step.

    Args:
        cell: ``"gru"`` or ``"lstm"``.
        in_features: Features per step of the input ``(batch, steps, in_features)``.
        hidden_size: Units of every layer.
        num_layers: Stacked layers.
        num_classes: Outputs of the head (1 for a regression).
        per_step: Output ``(batch, steps, num_classes)`` instead of ``(batch, num_classes)``;
            a regression with one output returns ``(batch,)``.
    """

    def __init__(self, cell: str, in_features: int, hidden_size: int, num_layers: int, num_classes: int, per_step: bool) -> None:
        super().__init__()
        layer = {"gru": GRULayer, "lstm": LSTMLayer}[cell]
        sizes = [in_features] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(layer(sizes[i], hidden_size) for i in range(num_layers))
        self.head = nn.Linear(hidden_size, num_classes)
        self.per_step = per_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        if not self.per_step:
            x = x[:, -1]
        out = self.head(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


def _check(hidden_size: int, num_layers: int) -> None:
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model option {name} must be a whole number >= 1, got {value!r}. Set model.options.{name}.")


@register_model("gru")
def gru(num_classes: int, in_channels: int, hidden_size: int = 64, num_layers: int = 1, per_step: bool = False) -> SequenceModel:
    """GRU sequence model (module docstring); ``in_channels`` is the features per step, set by the task."""
    _check(hidden_size, num_layers)
    return SequenceModel("gru", in_channels, hidden_size, num_layers, num_classes, per_step)


@register_model("lstm")
def lstm(num_classes: int, in_channels: int, hidden_size: int = 64, num_layers: int = 1, per_step: bool = False) -> SequenceModel:
    """LSTM sequence model (module docstring); ``in_channels`` is the features per step, set by the task."""
    _check(hidden_size, num_layers)
    return SequenceModel("lstm", in_channels, hidden_size, num_layers, num_classes, per_step)
