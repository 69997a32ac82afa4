"""Architecture decoupling: input-dependent channel gating trained to make paths class-specific.

After Li et al., "Dynamic / Interpretable Neural Network Decoupling" (arXiv 1906.01166; ECCV 2020
as "Interpretable Neural Network Decoupling"). No official code exists; what follows separates what
the paper's abstract states from our reconstruction of its details.

**From the abstract.** An *architecture controlling module* (ACM) in each convolution maps the
layer's input to an *architecture encoding* a_l in {0, 1}^C_out that switches the layer's output
channels (filters) on and off; the filters that are on form the input's *calculation path*. The
encodings are trained to carry information about the input's class (mutual information, which
"decouples" the architecture into class-specific paths) and to be sparse, so that inactive
filters can be skipped at inference (acceleration) and atypical paths reveal adversarial inputs.

**Reconstructed (not verified against the paper's text) and our choices:**

* ACM: global average pool of the conv's input -> ``Linear(C_in, h)`` -> ReLU ->
  ``Linear(h, C_out)`` -> sigmoid -> ``s``; the encoding is ``s > threshold`` in the forward
  pass with the straight-through gradient ``ds`` (``a = hard + (s - s.detach())``). Ours:
  ``h = max(4, C_out // acm_reduction)``; the last layer's bias starts at
  ``logit(threshold) + 1`` so that (almost) every gate starts open and the trained baseline is
  the starting point (the paper fine-tunes a pretrained CNN; its initialisation is unknown).
* Loss: ``CE(task) + lambda_mi * CE(q(A), y) + lambda_s * ||A||_1``: ``q`` is an auxiliary
  linear classifier on the concatenated encodings ``A`` (the variational lower bound
  ``I(A; Y) >= H(Y) + E[log q(y|A)]``); ``||A||_1`` is the number of open gates of a sample,
  averaged over the batch. ``q`` is owned by the method and trained by its own optimizer step
  (an :class:`~methods.Update`) on the detached encodings; the lambda_mi term trains the ACMs
  through the straight-through gradient.
* Where the gate acts (ours): the paper writes ``a_l * conv(x)``; we gate after the conv's batch
  norm, ``a_l * BN(conv(x))``, so that a closed filter outputs exactly 0 (BN would turn a zeroed
  conv output into its shift). This makes the paper's *alignment term* (pushing the outputs of
  inactive filters to zero) hold by construction, so it is not implemented.
* Which convolutions get an ACM (ours): those whose output channels can be removed on their own
  (torch-pruning's dependency graph, as gal's ``channel`` masks): every conv of a plain CNN, the
  inner conv of each residual block; never the classifier.
* Optimizer (ours): Adam for the network (``lr``) and for the ACMs and ``q`` (``acm_lr``): the
  L1 and MI gradients reaching a gate through the straight-through estimator are small, and Adam
  makes their scale irrelevant.

**Finalize (ours).** The gates' activation frequency is measured on the validation data; the
filters open on at most ``prune_below`` of the inputs are removed physically (the conv's output
channels, its batch norm, the rows of its ACM, and with torch-pruning every channel that reads
them: the next conv's inputs and the columns of the next ACM). With ``prune_below = 0`` only
filters never open on the validation data go, and the result computes exactly the gated model's
function on every input where they stay closed. Two deployable forms of the result exist:

* ``static``: every remaining filter is computed, then multiplied by its gate (dense, fixed
  shapes; its MACs are what the FLOP counter measures).
* ``dynamic``: each gated conv computes only the filters open for the batch (the union of the
  batch's paths) from only its nonzero input channels, and scatters them into a zero tensor. At
  batch size 1 this is the per-sample path. It exports with ``torch.export`` (data-dependent
  channel counts); its expected MACs per sample on the validation data are reported through
  :meth:`Decouple.cost`, so ``macs`` objectives rank the trial by them.

Which dynamic execution is faster here (``bench/decouple_digits.py``, digits_cnn, one CPU thread):
the per-batch union, by far: 1.5-10 ms for a batch of 16 against 28-103 ms for a per-sample
loop of batch-1 passes (each pays the gather and scatter overhead). Neither beats the dense
static form on these small models (0.45-0.7 ms against 0.9-2.3 ms at batch size 1): the index
operations cost more than the MACs they save, so the dynamic form's advantage is in MACs
(expected 1.07-1.29x below the static form's), not in CPU latency.

``form`` chooses which one the trial's model is; :meth:`Decouple.metrics` reports both forms'
MACs and CPU latency either way. Interpretation and adversarial detection: :func:`filter_paths`,
:func:`hamming_distances`, :func:`knn_accuracy`, :func:`fgsm_path_distances`, :func:`analyse` and
:func:`write_report`.
"""

from __future__ import annotations

import copy
import html
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from methods._base import Method, MethodContext
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._training import Phase, Step, Update
from methods.gal import find_mask_sites

__all__ = [
    "Decouple",
    "DecoupleConfig",
    "ArchitectureControl",
    "GatedConv",
    "Encodings",
    "find_gate_sites",
    "insert_gates",
    "gated_convs",
    "collect_encodings",
    "remove_inactive_filters",
    "set_dynamic",
    "expected_macs",
    "static_macs",
    "latencies",
    "filter_paths",
    "hamming_distances",
    "knn_accuracy",
    "auroc",
    "fgsm",
    "fgsm_path_distances",
    "Analysis",
    "analyse",
    "write_report",
]

#: Which form the trial's model is, from the least to the most compressing (in MACs).
Form = Literal["static", "dynamic"]


@dataclass(frozen=True)
class DecoupleConfig:
    lambda_s: float = hyperparameter(1e-3, "weight of the L1 norm of the encodings (open gates per sample)", Range(1e-4, 1e-2, log=True), at_least=0.0, compresses="high")
    lambda_mi: float = hyperparameter(1.0, "weight of the auxiliary classifier's CE on the encodings (mutual-information bound)", Range(0.1, 1.0), at_least=0.0)
    acm_reduction: Literal[4, 8, 16] = hyperparameter(4, "ACM hidden width: max(4, C_out // acm_reduction)", Range(choices=(4, 8, 16)), compresses="high")
    threshold: float = hyperparameter(0.5, "a gate is open where the ACM's sigmoid exceeds this", Range(0.3, 0.7), above=0.0, below=1.0, compresses="high")
    prune_below: float = hyperparameter(0.0, "filters open on at most this fraction of validation inputs are removed at finalize", Range(0.0, 0.1), at_least=0.0, below=1.0, compresses="high")
    form: Form = hyperparameter("dynamic", "the trial's model: static (dense, pruned) or dynamic (skips closed filters per input)", Range(choices=("static", "dynamic")), compresses="high")
    epochs: int | None = hyperparameter(None, "epochs of gated training; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True)
    lr: float = hyperparameter(1e-3, "learning rate of the network's weights (Adam)", Range(1e-4, 1e-2, log=True), above=0.0)
    acm_lr: float = hyperparameter(0.01, "learning rate of the ACMs and the auxiliary classifier (Adam)", Range(1e-3, 0.05, log=True), above=0.0)
    fgsm_epsilon: float = hyperparameter(0.25, "FGSM step (input units) of the adversarial-detection figures and report", above=0.0)


# ----------------------------------------------------------------------------------------------
# Modules: the ACM and the gated convolution.
# ----------------------------------------------------------------------------------------------


class ArchitectureControl(nn.Module):
    """The ACM: pooled input -> FC -> ReLU -> FC -> sigmoid -> binary encoding (straight-through).

    Returns ``(batch, out_channels)``: 1 for an open filter, 0 for a closed one. In training mode
    the gradient is that of the sigmoid (straight-through); in eval mode the exact 0/1 values.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, threshold: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        self.threshold = threshold
        with torch.no_grad():
            self.fc2.bias.fill_(math.log(threshold / (1.0 - threshold)) + 1.0)  # open at the start

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid before binarisation, ``(batch, out_channels)``."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.probabilities(x)
        hard = (s > self.threshold).to(s.dtype)
        if not self.training:
            return hard
        return hard + (s - s.detach())  # exactly 0/1 forward (s - s is 0), the sigmoid's gradient backward


class GatedConv(nn.Module):
    """``gate(x) * BN(conv(x))``, the gate from an :class:`ArchitectureControl` on the same input.

    With ``dynamic`` set, in eval mode only the filters open for some sample of the batch are
    computed, from the input channels that are nonzero somewhere in the batch; the others are
    zeros. The result is the same function (batch norm applied from its running statistics).

    Args:
        conv: The convolution (``groups == 1``).
        bn: The affine batch norm that followed it, or None.
        acm: The gate.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, acm: ArchitectureControl) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.acm = acm
        self.dynamic = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.acm(x)
        if self.dynamic and not self.training:
            return self._open_filters_only(x, gate)
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        return out * gate[:, :, None, None]

    @staticmethod
    def _first(size: int, device: torch.device) -> torch.Tensor:
        return torch.arange(size, device=device) == 0

    def _open_filters_only(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        # Channel 0 always runs, so no shape is empty when every gate (or input) is zero; it is
        # zero then too, and a data-independent shape needs no branch in the exported graph.
        outputs = torch.nonzero((gate.amax(0) > 0) | self._first(gate.shape[1], gate.device)).squeeze(1)
        inputs = torch.nonzero((x.abs().amax((0, 2, 3)) > 0) | self._first(x.shape[1], x.device)).squeeze(1)
        weight = conv.weight.index_select(0, outputs).index_select(1, inputs)
        bias = conv.bias.index_select(0, outputs) if conv.bias is not None else None
        out = F.conv2d(x.index_select(1, inputs), weight, bias, conv.stride, conv.padding, conv.dilation)
        if self.bn is not None:
            bn = self.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            out = out * scale.index_select(0, outputs)[None, :, None, None] + shift.index_select(0, outputs)[None, :, None, None]
        out = out * gate.index_select(1, outputs)[:, :, None, None]
        full = out.new_zeros(x.shape[0], conv.out_channels, out.shape[2], out.shape[3])
        return full.index_copy(1, outputs, out)


def gated_convs(model: nn.Module) -> dict[str, GatedConv]:
    """The model's gated convolutions by module name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GatedConv)}


def set_dynamic(model: nn.Module, dynamic: bool) -> None:
    """Make every gated conv of ``model`` the dynamic (skip closed filters) or the static form."""
    for m in gated_convs(model).values():
        m.dynamic = dynamic


# ----------------------------------------------------------------------------------------------
# Deciding where gates go; doing the insertion and the removal.
# ----------------------------------------------------------------------------------------------


def find_gate_sites(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str | None]]:
    """``(conv, batch norm or None)`` for every conv whose output channels can be removed on their own.

    The same units as gal's ``channel`` masks (torch-pruning's dependency graph); convolutions
    with ``groups > 1`` or a padding other than zeros are left out. Empty when the model has none (a gated pipeline then
    gates nothing).
    """
    try:
        units = find_mask_sites(model, example_input, "channel").channels
    except ValueError:
        return []
    sites = []
    for conv_name, scaled in units:
        conv = model.get_submodule(conv_name)
        if conv.groups != 1 or conv.padding_mode != "zeros":  # the dynamic form's gather assumes both
            continue
        sites.append((conv_name, None if scaled == conv_name else scaled))
    return sites


def insert_gates(model: nn.Module, sites: list[tuple[str, str | None]], acm_reduction: int, threshold: float) -> None:
    """Replace each site's conv by a :class:`GatedConv` (holding the conv and its batch norm) and the batch norm by an identity."""
    for conv_name, bn_name in sites:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        acm = ArchitectureControl(conv.in_channels, conv.out_channels, max(4, conv.out_channels // acm_reduction), threshold)
        acm.to(conv.weight.device)
        model.set_submodule(conv_name, GatedConv(conv, bn, acm))
        if bn_name is not None:
            model.set_submodule(bn_name, nn.Identity())


def remove_inactive_filters(
    model: nn.Module, sites: list[tuple[str, str | None]], keep: dict[str, list[int]], example_input: torch.Tensor
) -> int:
    """Physically remove every filter of each gated conv that ``keep[conv name]`` does not list; returns how many.

    The gated convs are unwrapped into their conv and batch norm, torch-pruning removes the
    filters with every channel that reads them (the next layers' inputs), the removed inputs
    of a gated conv are removed from its ACM's first layer too, and the gates are put back.
    """
    gated = gated_convs(model)
    acms = {name: gated[name].acm for name, _ in sites}
    for conv_name, bn_name in sites:
        model.set_submodule(conv_name, gated[conv_name].conv)
        if bn_name is not None:
            model.set_submodule(bn_name, gated[conv_name].bn)
    conv_of = {id(model.get_submodule(name)): name for name, _ in sites}
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    model.train(was_training)
    removed = 0
    for conv_name, _ in sites:
        conv = model.get_submodule(conv_name)
        kept = set(keep[conv_name])
        drop = [i for i in range(conv.out_channels) if i not in kept]
        if not drop:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop)
        for dep, idxs in group:
            target = dep.target.module
            if id(target) in conv_of and graph.is_in_channel_pruning_fn(dep.handler):
                _drop_columns(acms[conv_of[id(target)]].fc1, idxs)
        group.prune()
        _drop_rows(acms[conv_name].fc2, drop)
        removed += len(drop)
    for conv_name, bn_name in sites:
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        model.set_submodule(conv_name, GatedConv(model.get_submodule(conv_name), bn, acms[conv_name]))
        if bn_name is not None:
            model.set_submodule(bn_name, nn.Identity())
    return removed


def _drop_rows(linear: nn.Linear, drop: list[int]) -> None:
    """Remove the output features ``drop`` of ``linear``."""
    dropped = set(drop)
    kept = [i for i in range(linear.out_features) if i not in dropped]
    linear.weight = nn.Parameter(linear.weight.detach()[kept].clone())
    linear.bias = nn.Parameter(linear.bias.detach()[kept].clone())
    linear.out_features = len(kept)


def _drop_columns(linear: nn.Linear, drop: list[int]) -> None:
    """Remove the input features ``drop`` of ``linear``."""
    dropped = set(drop)
    kept = [i for i in range(linear.in_features) if i not in dropped]
    linear.weight = nn.Parameter(linear.weight.detach()[:, kept].clone())
    linear.in_features = len(kept)


# ----------------------------------------------------------------------------------------------
# Measuring: encodings on data, expected MACs, latency.
# ----------------------------------------------------------------------------------------------


@dataclass
class Encodings:
    """The binary encodings of a data set's inputs.

    Attributes:
        layers: ``{gated conv name: (N, C_out) bool}``: which filters were open for each input.
        targets: ``(N,)`` labels.
        predictions: ``(N,)`` the model's predicted classes.
    """

    layers: dict[str, torch.Tensor]
    targets: torch.Tensor
    predictions: torch.Tensor

    @property
    def paths(self) -> torch.Tensor:
        """``(N, total filters)`` float: the concatenated encodings, one row per input."""
        return torch.cat([v.float() for v in self.layers.values()], dim=1)


def _record_gates(model: nn.Module, found: dict[str, list[torch.Tensor]]) -> list[Any]:
    handles = []
    for name, m in gated_convs(model).items():
        found[name] = []
        handles.append(m.acm.register_forward_hook(lambda mod, args, out, name=name: found[name].append(out.detach().cpu() > 0.5)))
    return handles


@torch.no_grad()
def collect_encodings(model: nn.Module, loader: Any, device: torch.device | str) -> Encodings:
    """Run ``model`` in eval mode over ``loader`` and record every input's encodings, labels and predictions."""
    found: dict[str, list[torch.Tensor]] = {}
    handles = _record_gates(model, found)
    targets, predictions = [], []
    was_training = model.training
    model.eval()
    try:
        for inputs, labels in loader:
            outputs = model(inputs.to(device))
            predictions.append(outputs.argmax(1).cpu())
            targets.append(labels.cpu())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    layers = {name: torch.cat(v) for name, v in found.items() if v}
    return Encodings(layers, torch.cat(targets), torch.cat(predictions))


def _conv_macs(conv: nn.Conv2d, inputs: torch.Tensor | int, outputs: torch.Tensor | int, out_pixels: int) -> Any:
    kh, kw = conv.kernel_size
    return inputs * outputs * kh * kw * out_pixels


@torch.no_grad()
def expected_macs(model: nn.Module, loader: Any, device: torch.device | str, static_macs: float) -> float:
    """Expected MACs per sample of the dynamic form over ``loader``'s inputs.

    ``static_macs`` (the FLOP counter's figure for the static form at batch size 1) less, for
    every gated conv, its full cost and plus what it computes for each sample: the open filters
    times the sample's nonzero input channels times kernel size times output pixels. The ACMs'
    layers are in ``static_macs``.
    """
    per_sample: list[torch.Tensor] = []
    full = 0.0
    handles = []
    shapes: dict[str, int] = {}
    for name, m in gated_convs(model).items():

        def hook(mod: GatedConv, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            x = args[0]
            gate = mod.acm(x)
            pixels = out.shape[2] * out.shape[3]
            shapes[name] = pixels
            # At least one channel each way runs (GatedConv._open_filters_only).
            active_in = (x.abs().amax((2, 3)) > 0).sum(1).clamp_min(1)
            per_sample.append(_conv_macs(mod.conv, active_in, gate.sum(1).clamp_min(1), pixels).double().cpu())

        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, _ in loader:
            per_sample.clear()
            model(inputs.to(device))
            total += float(torch.stack(per_sample).sum())
            count += inputs.shape[0]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, m in gated_convs(model).items():
        full += _conv_macs(m.conv, m.conv.in_channels, m.conv.out_channels, shapes.get(name, 0))
    return static_macs - full + total / max(count, 1)


def static_macs(model: nn.Module, example_input: torch.Tensor) -> float:
    """MACs of one eval-mode pass at batch size 1 (``FlopCounterMode``: convolutions and matrix products).

    The trial's FLOP counter (``search.measure.count_flops``) gives the same figure for these
    layers; methods may not import ``search``.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops() // 2)


def _cpu_latency_ms(model: nn.Module, inputs: torch.Tensor, repeats: int) -> float:
    """Median CPU milliseconds of ``model(inputs)`` after two warm-up passes."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(inputs)
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def _per_sample(model: nn.Module) -> Any:
    return lambda x: torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])


def latencies(model: nn.Module, batch: torch.Tensor, repeats: int = 10) -> dict[str, float]:
    """CPU latency of both forms at batch size 1, and of the per-batch union against a per-sample loop on ``batch``.

    Runs on a CPU copy of ``model`` in eval mode. Keys: ``latency_ms_static``,
    ``latency_ms_dynamic`` (batch 1), ``latency_ms_static_batch``, ``latency_ms_union_batch``
    and ``latency_ms_per_sample_batch`` (the whole ``batch``).
    """
    cpu = copy.deepcopy(model).cpu().eval()
    batch = batch.cpu()
    out: dict[str, float] = {}
    set_dynamic(cpu, False)
    out["latency_ms_static"] = _cpu_latency_ms(cpu, batch[:1], repeats)
    out["latency_ms_static_batch"] = _cpu_latency_ms(cpu, batch, max(3, repeats // 3))
    set_dynamic(cpu, True)
    out["latency_ms_dynamic"] = _cpu_latency_ms(cpu, batch[:1], repeats)
    out["latency_ms_union_batch"] = _cpu_latency_ms(cpu, batch, max(3, repeats // 3))
    out["latency_ms_per_sample_batch"] = _cpu_latency_ms(_per_sample(cpu), batch, max(3, repeats // 3))
    return out


# ----------------------------------------------------------------------------------------------
# Interpretation and adversarial-input detection (ours: the paper's abstract names the uses).
# ----------------------------------------------------------------------------------------------


def filter_paths(encodings: Encodings, num_classes: int) -> dict[str, torch.Tensor]:
    """``{layer: (num_classes, C_out)}``: how often each filter is open for the inputs of each class (by label)."""
    out = {}
    for name, codes in encodings.layers.items():
        rows = []
        for c in range(num_classes):
            members = codes[encodings.targets == c]
            rows.append(members.float().mean(0) if len(members) else torch.zeros(codes.shape[1]))
        out[name] = torch.stack(rows)
    return out


def hamming_distances(paths: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean Hamming distance between the paths of two different inputs of the same class, and of different classes."""
    distance = torch.cdist(paths.float(), paths.float(), p=1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    different = labels[:, None] != labels[None, :]
    intra = float(distance[same].mean()) if same.any() else 0.0
    inter = float(distance[different].mean()) if different.any() else 0.0
    return intra, inter


def knn_accuracy(reference: torch.Tensor, reference_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Accuracy of a ``k``-nearest-neighbour vote (Hamming distance) of the queries' paths among the reference paths.

    Binary paths tie often, so every reference input as close as the ``k``-th nearest votes (no
    arbitrary tie-break); a tied vote goes to the lowest class.
    """
    distance = torch.cdist(queries.float(), reference.float(), p=1)
    kth = distance.kthvalue(min(k, len(reference)), dim=1).values
    neighbours = (distance <= kth[:, None]).float()
    classes = int(max(reference_labels.max(), labels.max())) + 1
    votes = neighbours @ F.one_hot(reference_labels, classes).float()
    return float((votes.argmax(1) == labels).float().mean())


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be higher for ``positives`` (ties count one half)."""
    if len(negatives) == 0 or len(positives) == 0:
        return 0.5
    greater = (positives[:, None] > negatives[None, :]).double().mean()
    ties = (positives[:, None] == negatives[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def fgsm(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """FGSM examples (Goodfellow et al.): ``inputs + epsilon * sign(grad of the CE)``, the model in eval mode."""
    x = inputs.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), targets)
    (grad,) = torch.autograd.grad(loss, x)
    return (inputs + epsilon * grad.sign()).detach()


@dataclass
class Analysis:
    """What :func:`analyse` found; :func:`write_report` renders it.

    Attributes:
        class_paths: :func:`filter_paths` of the reference data.
        intra, inter: :func:`hamming_distances` of the queries.
        knn_accuracy: :func:`knn_accuracy` of the queries among the reference inputs.
        clean_distances, adversarial_distances: each query's (and its FGSM example's) path's L1
            distance to the mean reference path of the class the model predicts for it.
        fgsm_auroc: How well that distance separates FGSM examples from clean inputs.
        fgsm_success: Fraction of FGSM examples that change the model's prediction.
        epsilon: The FGSM step, in input units.
    """

    class_paths: dict[str, torch.Tensor]
    intra: float
    inter: float
    knn_accuracy: float
    clean_distances: torch.Tensor
    adversarial_distances: torch.Tensor
    fgsm_auroc: float
    fgsm_success: float
    epsilon: float

    def figures(self) -> dict[str, float]:
        return {
            "intra_class_hamming": self.intra,
            "inter_class_hamming": self.inter,
            "knn_accuracy": self.knn_accuracy,
            "fgsm_auroc": self.fgsm_auroc,
            "fgsm_success": self.fgsm_success,
        }


def _first_examples(loader: Any, limit: int) -> Any:
    """``loader``'s batches until ``limit`` examples (the last one cut)."""
    seen = 0
    for inputs, labels in loader:
        if seen >= limit:
            return
        take = min(limit - seen, inputs.shape[0])
        yield inputs[:take], labels[:take]
        seen += take


def fgsm_path_distances(
    model: nn.Module, reference: Encodings, loader: Any, device: torch.device | str, epsilon: float, limit: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Path distances of clean inputs and of their FGSM examples to the mean path of the predicted class.

    Returns ``(clean distances, adversarial distances, fraction of FGSM examples that change the prediction)``.
    """
    num_classes = int(reference.targets.max()) + 1
    means = torch.stack([reference.paths[reference.targets == c].mean(0) if (reference.targets == c).any() else reference.paths.mean(0) for c in range(num_classes)])
    batches = list(_first_examples(loader, limit))
    clean = collect_encodings(model, batches, device)
    was_training = model.training
    model.eval()
    try:
        adversarial_batches = [(fgsm(model, x.to(device), y.to(device), epsilon).cpu(), y) for x, y in batches]
    finally:
        model.train(was_training)
    adversarial = collect_encodings(model, adversarial_batches, device)

    def distance(enc: Encodings) -> torch.Tensor:
        predicted = enc.predictions.clamp_max(num_classes - 1)
        return (enc.paths - means[predicted]).abs().sum(1)

    success = float((adversarial.predictions != clean.predictions).float().mean())
    return distance(clean), distance(adversarial), success


def analyse(model: nn.Module, reference_loader: Any, query_loader: Any, device: torch.device | str, epsilon: float, limit: int = 1000) -> Analysis:
    """Paths per class on the reference data; Hamming distances, kNN accuracy and FGSM detection on the queries.

    Runs on the gated model in its static form (restored afterwards); at most ``limit``
    examples of each loader.
    """
    dynamic = {name: m.dynamic for name, m in gated_convs(model).items()}
    set_dynamic(model, False)
    try:
        reference = collect_encodings(model, list(_first_examples(reference_loader, limit)), device)
        queries = collect_encodings(model, list(_first_examples(query_loader, limit)), device)
        num_classes = int(max(reference.targets.max(), queries.targets.max())) + 1
        intra, inter = hamming_distances(queries.paths, queries.targets)
        knn = knn_accuracy(reference.paths, reference.targets, queries.paths, queries.targets)
        clean, adversarial, success = fgsm_path_distances(model, reference, query_loader, device, epsilon, limit)
    finally:
        for name, m in gated_convs(model).items():
            m.dynamic = dynamic[name]
    return Analysis(filter_paths(reference, num_classes), intra, inter, knn, clean, adversarial, auroc(clean, adversarial), success, epsilon)


def write_report(analysis: Analysis, folder: Path, figures: dict[str, float] | None = None) -> list[Path]:
    """Write ``report.html`` with ``paths.png`` (per-class filter paths per layer) and ``fgsm.png`` into ``folder``.

    Returns the files written.
    """
    import matplotlib  # noqa: PLC0415  heavy, and only for the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = list(analysis.class_paths.items())
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.2 * max(len(layers), 1)), squeeze=False)
    for ax, (name, frequency) in zip(axes[:, 0], layers):
        image = ax.imshow(frequency.numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name}: how often each filter is open, per class", fontsize=9)
        ax.set_ylabel("class")
        ax.set_xlabel("filter")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    paths_png = folder / "paths.png"
    fig.savefig(paths_png, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = 30
    ax.hist(analysis.clean_distances.numpy(), bins=bins, alpha=0.6, label="clean")
    ax.hist(analysis.adversarial_distances.numpy(), bins=bins, alpha=0.6, label=f"FGSM (eps {analysis.epsilon:g})")
    ax.set_xlabel("L1 distance of the path to the predicted class's mean path")
    ax.set_ylabel("inputs")
    ax.legend()
    fig.tight_layout()
    fgsm_png = folder / "fgsm.png"
    fig.savefig(fgsm_png, dpi=90)
    plt.close(fig)
    rows = {**analysis.figures(), **(figures or {})}
    table = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in rows.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>decouple: calculation paths</title></head>
<body>
<h1>Architecture decoupling: calculation paths</h1>
<p>Intra-class Hamming distance between two inputs' paths: {analysis.intra:.2f}; inter-class: {analysis.inter:.2f}.
kNN (k=5) on the paths predicts the class with accuracy {analysis.knn_accuracy:.3f}.
FGSM examples (eps {analysis.epsilon:g}, {analysis.fgsm_success:.1%} change the prediction) are told from clean inputs by
their path's distance to the predicted class's mean path with AUROC {analysis.fgsm_auroc:.3f}.</p>
<table border="1" cellpadding="3"><tr><th>figure</th><th>value</th></tr>
{table}
</table>
<h2>Per-class filter paths</h2><img src="paths.png" alt="per-class filter paths">
<h2>Adversarial-input detection</h2><img src="fgsm.png" alt="path distances of clean and FGSM inputs">
</body></html>
"""
    report = folder / "report.html"
    report.write_text(page)
    return [report, paths_png, fgsm_png]


# ----------------------------------------------------------------------------------------------
# The method.
# ----------------------------------------------------------------------------------------------


@register_method
class Decouple(Method):
    """Input-dependent channel gating that decouples a CNN into class-specific paths (arXiv 1906.01166)."""

    name = "decouple"
    Config = DecoupleConfig
    kind = "pruning"
    changes_architecture = True
    # Later methods would rebuild or quantize the gated convs, whose dynamic form reads their
    # weights directly: the gated architecture is final.
    must_be_last = True

    def __init__(self, config: DecoupleConfig | None = None) -> None:
        super().__init__(config)
        self.sites: list[tuple[str, str | None]] = []
        self.aux: nn.Linear | None = None
        self.figures: dict[str, float] = {}

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.sites = find_gate_sites(model, ctx.example_input)
        if not self.sites:
            ctx.log(f"[decouple] {type(model).__name__} has no conv whose filters can be gated on their own; nothing is gated")
            return model
        was_training = model.training
        with torch.no_grad():
            classes = model.eval()(ctx.example_input).shape[1]
        model.train(was_training)
        with torch.random.fork_rng(devices=[]):  # the ACMs' initial weights, without moving the trial's random stream
            torch.manual_seed(ctx.seed)
            insert_gates(model, self.sites, self.config.acm_reduction, self.config.threshold)
        filters = sum(m.conv.out_channels for m in gated_convs(model).values())
        self.aux = nn.Linear(filters, classes).to(ctx.device)
        ctx.log(f"[decouple] gates on {filters} filters of {len(self.sites)} convolutions")
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        epochs = ctx.epochs if self.config.epochs is None else self.config.epochs
        updates = (Update("auxiliary", self._aux_groups, self.aux_loss, lr=self.config.acm_lr, optimizer="adam", weight_decay=0.0),) if self.aux is not None else ()
        return [Phase(name="gated", epochs=epochs, lr=self.config.lr, param_groups=self.param_groups, updates=updates, optimizer="adam")]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The network's weights at ``lr``, the ACMs at ``acm_lr`` without weight decay."""
        acm = {id(p) for m in gated_convs(model).values() for p in m.acm.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if id(p) not in acm]},
            {"params": [p for p in params if id(p) in acm], "lr": self.config.acm_lr, "weight_decay": 0.0},
        ]

    def _aux_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.aux.parameters())}]

    def feature_modules(self) -> tuple[str, ...]:
        return tuple(f"{conv}.acm" for conv, _ in self.sites)

    def encodings(self, step: Step) -> torch.Tensor:
        """``(batch, filters)``: the step's concatenated encodings (straight-through gradients)."""
        return torch.cat([step.features(name) for name in self.feature_modules()], dim=1)

    def aux_loss(self, step: Step) -> torch.Tensor:
        """The auxiliary classifier's own step, before the model's: CE on the detached encodings."""
        return F.cross_entropy(self.aux(self.encodings(step).detach()), step.targets)

    def loss(self, step: Step) -> torch.Tensor | None:
        """``lambda_mi * CE(q(A), y) + lambda_s * ||A||_1`` (open gates per sample, batch mean)."""
        if not self.sites:
            return None
        codes = self.encodings(step)
        mi = F.cross_entropy(self.aux(codes), step.targets)
        return self.config.lambda_mi * mi + self.config.lambda_s * codes.sum(1).mean()

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if not self.sites:
            self.figures = {}
            return model
        encodings = collect_encodings(model, ctx.val_loader, ctx.device)
        keep: dict[str, list[int]] = {}
        filters = 0
        for name, codes in encodings.layers.items():
            frequency = codes.float().mean(0)
            kept = (frequency > self.config.prune_below).nonzero().flatten().tolist()
            keep[name] = kept or [int(frequency.argmax())]  # a layer keeps one filter so its shapes stay valid
            filters += codes.shape[1]
        active = float(encodings.paths.mean())
        removed = remove_inactive_filters(model, self.sites, keep, ctx.example_input)
        static = static_macs(model, ctx.example_input)
        dynamic = expected_macs(model, ctx.val_loader, ctx.device, static)
        batch = next(iter(ctx.val_loader))[0][:16]
        self.figures = {
            "active_ratio": active,
            "filters": float(filters),
            "filters_removed": float(removed),
            "static_macs": static,
            "dynamic_macs": dynamic,
            **latencies(model, batch),
        }
        set_dynamic(model, self.config.form == "dynamic")
        self.figures.update(analyse(model, ctx.train_loader, ctx.val_loader, ctx.device, self.config.fgsm_epsilon).figures())
        ctx.log(
            f"[decouple] {active:.1%} of gates open on validation data; removed {removed}/{filters} filters; "
            f"MACs static {static:,.0f}, dynamic {dynamic:,.0f}"
        )
        return model

    def cost(self, model: nn.Module, ctx: MethodContext) -> dict[str, float]:
        """The dynamic form's expected MACs per sample on the validation data; nothing for the static form."""
        gated = gated_convs(model)
        if not gated or not any(m.dynamic for m in gated.values()):
            return {}
        set_dynamic(model, False)
        try:
            static = static_macs(model, ctx.example_input)
        finally:
            set_dynamic(model, True)
        return {"macs": expected_macs(model, ctx.val_loader, ctx.device, static)}

    def metrics(self) -> dict[str, float]:
        """``active_ratio`` (open gates on validation data, before removal), ``filters`` and
        ``filters_removed``, ``static_macs`` and ``dynamic_macs`` (expected per sample), CPU
        latencies (:func:`latencies`), and :meth:`Analysis.figures` (paths on the training data
        as reference, the validation data as queries)."""
        return dict(self.figures)

    def artifacts(self, model: nn.Module, ctx: MethodContext, folder: Path) -> list[Path]:
        """The interpretation report (:func:`write_report`) of the final model."""
        if not gated_convs(model):
            return []
        analysis = analyse(model, ctx.train_loader, ctx.val_loader, ctx.device, self.config.fgsm_epsilon)
        return write_report(analysis, folder, self.figures)

    def state_dict(self) -> dict[str, Any]:
        aux = None
        if self.aux is not None:
            aux = {"shape": [self.aux.in_features, self.aux.out_features], "weights": self.aux.state_dict()}
        return {"sites": [list(s) for s in self.sites], "aux": aux, "figures": dict(self.figures)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sites = [(conv, bn) for conv, bn in state["sites"]]
        self.aux = None
        if state["aux"] is not None:
            weights = state["aux"]["weights"]
            self.aux = nn.Linear(*state["aux"]["shape"]).to(weights["weight"].device)
            self.aux.load_state_dict(weights)
        self.figures = dict(state["figures"])
