"""Learnable-wavelet compression of square linear maps (Wolter, Lin, Yao, ICANN 2020, arXiv 2004.09569).

A dense ``n x n`` matrix is replaced by :class:`WaveletLinear`, ``y = S W^-1 G P W B x``: ``B``,
``G`` and ``S`` are learnable diagonals (all 1 at the start), ``P`` a fixed random permutation of
the wavelet coefficients (an index, not a matrix), ``W`` a multi-level fast wavelet transform
(zero padding) and ``W^-1`` its synthesis. The four filters of the layer (``dec_lo``, ``dec_hi``,
``rec_lo``, ``rec_hi``, length ``L``) are learnt; a loss keeps them a valid wavelet: alias
cancellation (``rec_lo[k] = -(-1)^k dec_hi[k]``, ``rec_hi[k] = (-1)^k dec_lo[k]``) plus perfect
reconstruction (``dec_lo * rec_lo + dec_hi * rec_hi = 2 delta`` at the centre tap), both as
squared errors (:func:`wavelet_loss`). The layer stores ``2n + coefficients + 4L`` weights instead
of ``n^2``; it is the deployed model (nothing is folded back).

Which maps: the hidden-to-hidden gate maps of the ``gru``/``lstm`` models (:mod:`models.recurrent`),
chosen by ``mode`` (GRU: ``state``, ``reset``, ``update``, ``gates`` = reset and update,
``state_reset``, ``state_update``, ``full``; LSTM: ``state`` = the cell candidate, ``gates`` = input,
forget and output, ``full``), and every square ``nn.Linear`` outside recurrent layers (the paper's
MNIST CNN ``fc1``; its bias is kept) but the classifier (the layer whose output is the model's:
a ``gru`` with as many classes as hidden units keeps its head). ``torch.nn.GRU``/``LSTM`` fuse
their gates in one native kernel and are refused, as is a model with no square map
(``digits_cnn``, ``resnet20``).

``P`` is stored as int16 indices (int32 past 32,767 coefficients), and ``deploy.size_bytes``
counts them (``WaveletLinear.storage_bits``): at ``n = 512`` and 4 levels the 529 indices take
1,058 bytes beside the layer's 6,308 bytes of floats (as int64 they took 4,232, uncounted).

Decomposition and reconstruction use running (cumulative) offsets into the coefficient vector;
the official code (EUPL) restarts each slice at the previous level's length, which misaligns the
levels from the third slice on. Nothing here is taken from that code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods._base import Method, MethodContext, NotApplicable
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import output_layers
from methods._training import Phase, Step
from models.recurrent import GRU_GATES, GRULayer, LSTMLayer

__all__ = [
    "Wavelet",
    "WaveletConfig",
    "WaveletLinear",
    "daubechies",
    "filter_bank",
    "coefficient_lengths",
    "wavelet_loss",
    "gates_of_mode",
]

Init = Literal["haar", "db2", "db3", "db4", "db5", "db6", "random"]
Mode = Literal["state", "reset", "update", "state_reset", "state_update", "gates", "full"]

#: The GRU gate maps each mode replaces (module docstring); listed from least to most compressing.
GRU_MODES: dict[str, tuple[str, ...]] = {
    "state": ("state",),
    "reset": ("reset",),
    "update": ("update",),
    "state_reset": ("state", "reset"),
    "state_update": ("state", "update"),
    "gates": ("reset", "update"),
    "full": GRU_GATES,
}
LSTM_MODES: dict[str, tuple[str, ...]] = {
    "state": ("cell",),
    "gates": ("input", "forget", "output"),
    "full": ("input", "forget", "cell", "output"),
}


# --- deciding: filters, lengths, losses ------------------------------------------------------------


def daubechies(order: int) -> np.ndarray:
    """The Daubechies-``order`` reconstruction low-pass filter (length ``2 * order``, sum sqrt 2).

    Derived by spectral factorisation: ``H(z) = ((1 + z^-1) / 2)^N Q(z)`` with
    ``|Q|^2 = P(sin^2(w/2))``, ``P(y) = sum_k C(N-1+k, k) y^k``; each root ``y`` of ``P`` gives
    ``z^2 - (2 - 4y) z + 1 = 0``, whose root inside the unit circle is kept (minimum phase).
    ``daubechies(1)`` is Haar; ``daubechies(2)`` is ``[0.4830, 0.8365, 0.2241, -0.1294]``.
    """
    if order < 1:
        raise ValueError(f"a Daubechies order must be >= 1, but got {order}.")
    poly = [math.comb(order - 1 + k, k) for k in range(order)]
    h = np.array([1.0])
    for _ in range(order):
        h = np.convolve(h, [1.0, 1.0])
    for y in np.roots(poly[::-1]) if order > 1 else []:
        pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
        h = np.convolve(h, [1.0, -pair[np.argmin(np.abs(pair))]])
    h = np.real(h)
    return h * math.sqrt(2.0) / h.sum()


def filter_bank(rec_lo: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(dec_lo, dec_hi, rec_lo, rec_hi)`` of the orthogonal wavelet whose reconstruction low-pass is ``rec_lo``.

    ``dec_lo`` is ``rec_lo`` reversed, ``rec_hi[k] = (-1)^k dec_lo[k]``, ``dec_hi`` is
    ``rec_hi`` reversed: the relations :func:`wavelet_loss` holds the learnt filters to.
    """
    rec_lo = torch.as_tensor(np.asarray(rec_lo, dtype=np.float64)).float()
    sign = _sign(len(rec_lo))
    dec_lo = rec_lo.flip(0)
    rec_hi = sign * dec_lo
    return dec_lo, rec_hi.flip(0), rec_lo, rec_hi


def initial_filters(init: str, length: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """The four filters of ``init``: Haar or dbN zero-padded to ``length`` (centred), or uniform in [-1, 1]."""
    if init == "random":
        return tuple(torch.rand(length, generator=generator) * 2 - 1 for _ in range(4))
    base = daubechies(1 if init == "haar" else int(init[2:]))
    if len(base) > length:
        raise ValueError(f"wavelet '{init}' has {len(base)} taps, more than filter_length={length}; raise filter_length to {len(base)}.")
    left = (length - len(base)) // 2
    return filter_bank(np.pad(base, (left, length - len(base) - left)))


def _sign(length: int, like: torch.Tensor | None = None) -> torch.Tensor:
    sign = torch.tensor([(-1.0) ** k for k in range(length)])
    return sign if like is None else sign.to(like)


def wavelet_loss(
    dec_lo: torch.Tensor, dec_hi: torch.Tensor, rec_lo: torch.Tensor, rec_hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ACL, PRL)``: the alias-cancellation and perfect-reconstruction squared errors of a filter bank."""
    sign = _sign(len(dec_lo), dec_lo)
    acl = ((rec_lo + sign * dec_hi) ** 2).sum() + ((rec_hi - sign * dec_lo) ** 2).sum()
    length = len(dec_lo)
    product = _full_convolution(dec_lo, rec_lo) + _full_convolution(dec_hi, rec_hi)
    target = torch.zeros_like(product)
    target[length - 1] = 2.0
    return acl, ((product - target) ** 2).sum()


def _full_convolution(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``numpy.convolve(a, b)`` (length ``len(a) + len(b) - 1``), differentiable."""
    return F.conv1d(F.pad(a, (len(b) - 1, len(b) - 1))[None, None], b.flip(0)[None, None])[0, 0]


def coefficient_lengths(features: int, levels: int, filter_length: int) -> list[int]:
    """Lengths of the approximation after each level: ``[n, l1, ..., lJ]``, ``l = floor((l_prev + L - 1) / 2)``."""
    lengths = [features]
    for _ in range(levels):
        lengths.append((lengths[-1] + filter_length - 1) // 2)
    return lengths


def gates_of_mode(layer: nn.Module, mode: str) -> tuple[str, ...]:
    """The gate maps of a recurrent ``layer`` that ``mode`` replaces; ValueError for a mode the cell lacks."""
    modes = GRU_MODES if isinstance(layer, GRULayer) else LSTM_MODES
    if mode not in modes:
        raise ValueError(f"wavelet mode '{mode}' names GRU gates; an LSTM takes mode {', '.join(LSTM_MODES)}.")
    return modes[mode]


# --- doing: the layer ------------------------------------------------------------------------------


class WaveletLinear(nn.Module):
    """``y = S W^-1 G P W B x (+ bias)`` on the last dimension of ``x`` (module docstring).

    Args:
        features: ``n``, the input and output size.
        levels: Levels of the wavelet transform.
        filter_length: ``L``, taps of each of the four filters.
        init: ``haar`` or ``db2`` .. ``db6`` (zero-padded to ``L``), or ``random`` (uniform in [-1, 1]).
        dropout: Dropout on the three diagonals while training.
        bias: Add a learnable bias (a replaced ``nn.Linear``'s, so that it is kept).
        permute: Draw the coefficient permutation (False: the identity, for tests).
        seed: Seed of the permutation and of a random init.
    """

    def __init__(
        self,
        features: int,
        levels: int,
        filter_length: int = 6,
        init: str = "haar",
        dropout: float = 0.0,
        bias: bool = False,
        permute: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.features, self.levels, self.dropout = features, levels, dropout
        self.lengths = coefficient_lengths(features, levels, filter_length)
        self.coefficients = self.lengths[-1] + sum(self.lengths[1:])
        generator = torch.Generator().manual_seed(seed)
        self.dec_lo, self.dec_hi, self.rec_lo, self.rec_hi = (
            nn.Parameter(f.clone()) for f in initial_filters(init, filter_length, generator)
        )
        self.scale_in = nn.Parameter(torch.ones(features))
        self.scale_coefficients = nn.Parameter(torch.ones(self.coefficients))
        self.scale_out = nn.Parameter(torch.ones(features))
        order = torch.randperm(self.coefficients, generator=generator) if permute else torch.arange(self.coefficients)
        self.register_buffer("permutation", order.to(self._index_dtype(self.coefficients)))
        for level in range(1, levels + 1):
            # Coefficient k of a level reads input positions 2k + 1 - i for filter tap i (odd
            # samples of the full convolution); in window order that is 2k + j - (L - 2).
            size, length = self.lengths[level], self.lengths[level - 1]
            window = 2 * torch.arange(size)[:, None] + torch.arange(filter_length)[None, :] - (filter_length - 2)
            window[(window < 0) | (window >= length)] = length
            self.register_buffer(f"window_{level}", window, persistent=False)
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    @staticmethod
    def _index_dtype(count: int) -> torch.dtype:
        return torch.int16 if count <= torch.iinfo(torch.int16).max + 1 else torch.int32

    def storage_bits(self) -> dict[str, int]:
        """Bits per element of the permutation when stored (read by ``deploy.size_bytes``)."""
        return {"permutation": torch.iinfo(self.permutation.dtype).bits}

    def stored_weight_counts(self) -> dict[str, int]:
        """The permutation is an index, not weights (read by ``deploy.count_params``)."""
        return {"permutation": 0}

    def extra_repr(self) -> str:
        return f"features={self.features}, levels={self.levels}, filter_length={len(self.dec_lo)}, coefficients={self.coefficients}"

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """The multi-level transform of ``x`` ``(batch, n)``: ``[a_J, d_J, ..., d_1]`` concatenated ``(batch, coefficients)``."""
        weight = torch.stack([self.dec_lo.flip(0), self.dec_hi.flip(0)], dim=1)
        details = []
        approx = x
        for level in range(1, self.levels + 1):
            # The strided convolution as windows times filters: one gather (the zero padding is an
            # index past the end, onto an appended zero) and one matmul, several times faster than
            # conv1d on these short signals; the FLOP counter counts the same MACs.
            padded = torch.cat([approx, approx.new_zeros(approx.shape[0], 1)], dim=1)
            bands = padded[:, self._window(level)] @ weight
            approx = bands[..., 0]
            details.append(bands[..., 1])
        return torch.cat([approx, *reversed(details)], dim=1)

    def synthesis(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`analysis`: ``(batch, coefficients)`` back to ``(batch, n)``."""
        weight = torch.stack([self.rec_lo, self.rec_hi])
        start = self.lengths[-1]
        approx = coefficients[:, :start]
        for level in range(self.levels, 0, -1):
            size, out = self.lengths[level], self.lengths[level - 1]
            # The running offset: each level's details follow the previous slice's end.
            detail = coefficients[:, start : start + size]
            start += size
            # The transposed strided convolution, cropped: every coefficient's filter-weighted
            # copy added at the positions its analysis window read (past the end: a dropped column).
            pieces = torch.stack([approx, detail], dim=-1) @ weight
            full = coefficients.new_zeros(coefficients.shape[0], out + 1)
            approx = full.index_add(1, self._window(level).reshape(-1), pieces.reshape(pieces.shape[0], -1))[:, :out]
        return approx

    def _window(self, level: int) -> torch.Tensor:
        """``(lengths[level], L)`` positions in the level's input read by each coefficient; ``lengths[level - 1]`` marks the zero padding."""
        return getattr(self, f"window_{level}")

    def _diagonal(self, scale: torch.Tensor) -> torch.Tensor:
        return F.dropout(scale, self.dropout, self.training) if self.dropout > 0 else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.features) * self._diagonal(self.scale_in)
        coefficients = self.analysis(flat).index_select(1, self.permutation.long()) * self._diagonal(self.scale_coefficients)
        out = self.synthesis(coefficients) * self._diagonal(self.scale_out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(shape)

    def wavelet_loss(self) -> torch.Tensor:
        """ACL + PRL of this layer's filters."""
        acl, prl = wavelet_loss(self.dec_lo, self.dec_hi, self.rec_lo, self.rec_hi)
        return acl + prl


# --- the method -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveletConfig:
    mode: Mode = hyperparameter(
        "state",
        "which GRU/LSTM hidden-to-hidden gate maps become wavelet layers (square nn.Linear layers always do)",
        Range(choices=("state", "state_reset", "gates", "full")),
        compresses="high",
    )
    levels: int = hyperparameter(4, "levels (scales) of the wavelet transform", Range(1, 6), at_least=1)
    filter_length: int = hyperparameter(6, "taps of each of the four learnt filters (even)", Range(choices=(6, 8, 12)))
    init: Init = hyperparameter(
        "haar",
        "filter init: haar or db2..db6 zero-padded to filter_length, or random in [-1, 1]",
        Range(choices=("haar", "db2", "db3", "random")),
    )
    wave_loss_weight: float = hyperparameter(1.0, "weight of ACL + PRL in the training loss", Range(0.1, 10.0, log=True), at_least=0.0)
    dropout: float = hyperparameter(
        0.0, "dropout on the three diagonals while training (the paper: 0 for RNNs)", Range(0.0, 0.3), at_least=0.0, below=1.0
    )
    epochs: int | None = hyperparameter(
        None, "epochs of training the wavelet layers; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True
    )
    lr: float | None = hyperparameter(
        None, "learning rate of that training; unset (null): the space's training.lr", Range(1e-4, 0.1, log=True), above=0.0
    )

    def __post_init__(self) -> None:
        # Rules no bound states: an even length, and one that holds the init's taps.
        if self.filter_length < 2 or self.filter_length % 2:
            raise ValueError(f"`filter_length` must be even and >= 2, but got filter_length={self.filter_length}.")
        taps = {"haar": 2, "random": 2}.get(self.init) or 2 * int(self.init[2:])
        if taps > self.filter_length:
            raise ValueError(f"init '{self.init}' has {taps} taps, but filter_length={self.filter_length}; set filter_length >= {taps}.")


def wavelet_sites(model: nn.Module, mode: str, example_input: torch.Tensor | None = None) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` of every map the method replaces in ``model`` (module docstring).

    With ``example_input``, the classifier (the layer whose output is the model's) is left alone
    when it is a square ``nn.Linear``.

    Raises:
        NotApplicable: The model uses ``torch.nn`` recurrent layers or has no map to replace.
        ValueError: ``mode`` names gates an LSTM lacks.
    """
    fused = [name for name, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if fused:
        raise NotApplicable(
            f"wavelet cannot reach the gate matrices of torch.nn recurrent layers ({', '.join(fused)}: fused weights); "
            "build the model with slimtune's 'gru' or 'lstm' models, whose gates are separate modules."
        )
    sites, square = [], []
    recurrent = {name for name, m in model.named_modules() if isinstance(m, (GRULayer, LSTMLayer))}
    for name, module in model.named_modules():
        if name in recurrent:
            sites += [(module, f"hh_{gate}", getattr(module, f"hh_{gate}")) for gate in gates_of_mode(module, mode)]
            continue
        if any(name.startswith(prefix + ".") for prefix in recurrent):
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Linear and child.in_features == child.out_features:
                square.append((f"{name}.{child_name}" if name else child_name, (module, child_name, child)))
    if square and example_input is not None:
        classifier = set(output_layers(model, example_input))
        square = [entry for entry in square if entry[0] not in classifier]
    sites += [site for _, site in square]
    if not sites:
        raise NotApplicable(
            "wavelet found no square linear map in the model: it replaces the hidden-to-hidden gate maps of the "
            "'gru'/'lstm' models and square nn.Linear layers (mnist_cnn with fc_width=1024); choose such a model."
        )
    return sites


@register_method
class Wavelet(Method):
    """Replaces square linear maps (RNN gates, MLPs) by learnable fast wavelet transforms (arXiv 2004.09569)."""

    name = "wavelet"
    Config = WaveletConfig
    kind = "reparameterisation"
    changes_architecture = True
    loss_scope = "later"  # the filters must stay a wavelet in every phase where the layers exist
    example_models = ("gru",)
    applies_to = "square nn.Linear maps and the hidden-to-hidden gate maps of gru/lstm models, replaced by wavelet layers"

    def __init__(self, config: WaveletConfig | None = None) -> None:
        super().__init__(config)
        self.figures: dict[str, float] = {}

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Swap every chosen map for a fresh :class:`WaveletLinear` (on the model's device)."""
        config = self.config
        replaced = stored = 0
        for index, (parent, attribute, linear) in enumerate(wavelet_sites(model, config.mode, ctx.example_input)):
            layer = WaveletLinear(
                linear.in_features,
                config.levels,
                config.filter_length,
                config.init,
                config.dropout,
                bias=linear.bias is not None,
                seed=ctx.seed + index,
            ).to(linear.weight.device)
            setattr(parent, attribute, layer)
            replaced += linear.weight.numel()
            stored += sum(p.numel() for p in layer.parameters()) - (linear.in_features if linear.bias is not None else 0)
            ctx.log(
                f"[wavelet] {type(parent).__name__}.{attribute}: {linear.weight.numel()} weights -> {layer.coefficients} coefficients, {stored} stored so far"
            )
        self.figures = {"layers": float(index + 1), "dense_weights": float(replaced), "wavelet_weights": float(stored)}
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        epochs = self.config.epochs if self.config.epochs is not None else ctx.epochs
        return [Phase(name="train", epochs=epochs, lr=self.config.lr)]

    def loss(self, step: Step) -> torch.Tensor | None:
        """``wave_loss_weight * sum(ACL + PRL)`` over the model's wavelet layers (None without any)."""
        layers = [m for m in step.model.modules() if isinstance(m, WaveletLinear)]
        if not layers or self.config.wave_loss_weight == 0:
            return None
        return self.config.wave_loss_weight * sum(layer.wavelet_loss() for layer in layers)

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        layers = [m for m in model.modules() if isinstance(m, WaveletLinear)]
        with torch.no_grad():
            self.figures["wave_loss"] = float(sum(layer.wavelet_loss() for layer in layers)) if layers else 0.0
        return model

    def metrics(self) -> dict[str, float]:
        return dict(self.figures)

    def state_dict(self) -> dict[str, float]:
        return dict(self.figures)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.figures = dict(state)
