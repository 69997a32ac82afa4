"""KSE: kernel sparsity and entropy (Li et al., "Exploiting Kernel Sparsity and Entropy for Interpretable CNN Compression", CVPR 2019).

arXiv 1812.04368; written from the paper's description, not from the official code (which has no
license).

Deciding, per input channel ``c`` of every eligible convolution (weight ``N x C x k x k``):

* kernel sparsity ``s_c = sum_n |W[n, c]|_1``;
* kernel entropy: the ``N`` kernels reading ``c`` are points in ``k*k`` dimensions; ``dm_n`` is the
  sum of the distances of kernel ``n`` to its ``K = 5`` nearest neighbours (``N - 1`` when fewer),
  and ``e_c = -sum_n p_n log2 p_n`` with ``p_n = dm_n / sum dm``;
* the indicator ``v_c = sqrt(s'_c / (1 + e'_c))`` of the min-max normalised ``s'`` and ``e'``,
  min-max normalised again (the paper's balance weight on ``e`` is 1, as in its code);
* the level ``g_c = floor(v_c * G)``, the top value going to ``G - 1``. Level 0: the channel is
  removed; level ``G - 1``: its ``N`` kernels are kept as they are; between: its kernels are
  clustered into ``q_g = ceil(N * 2^(g + 1 - T - G))`` centroids.

Doing: channels are removed (and, where the channel feeds only this convolution, the previous
layer's output channel and batch norm go too, with torch-pruning); each clustered channel's
kernels are clustered by scikit-learn's ``KMeans`` (k-means++ initialisation, ten restarts as in
the paper's code, seeded with the trial's seed), and the layer becomes a :class:`ClusteredConv2d` that
stores the centroids, one ``ceil(log2 q)``-bit index per (filter, channel) bit-packed, and the
kept channels' indices. Then a fine-tune trains the centroids, the full kernels and the rest of the
model (the indices stay fixed). All layers are decided at once, from the weights the method
receives (one shot, data-free up to the fine-tune).

:class:`ClusteredConv2d` (:mod:`methods._clustered_conv`) has two inference paths that compute
the same function: ``"clustered"`` (one grouped convolution per group of channels computes every
(channel, centroid) map once, then each filter sums its channels' maps picked by index) and
``"dense"`` (the weight rebuilt from the centroids, one convolution).

A batch norm that reads a clustered layer's output and nothing else is folded into the layer at
finalize (:meth:`ClusteredConv2d.absorb_batch_norm`; it becomes ``nn.Identity`` where it was).
A channel's centroids are shared by all the filters, each with its own batch-norm scale, so the
scale cannot go into the centroids without one table per filter: on the dense path it multiplies
the materialised weight (one convolution, no batch norm, in the exported program computed once
at load), on the clustered path it weights each filter's sum of picked maps. A fine-tune after
finalize (``kd``) still trains with the batch norm on batch statistics, as before; the measured
``macs``, ``params`` and latency are those of the folded layer in eval mode. The batch norm's
``gamma`` and ``beta`` stay counted in ``params`` (as the baseline's, whose batch norms are
folded only in its exported copy).

Training always uses the dense path. Finalize times both paths of each layer on its own input
shape (``timing_batch_size``) with the trial's timer (``deploy.latency_ms``) and keeps the faster
(``path: auto``), unless ``path`` forces one; the method's metrics say how many layers took which.
The choice depends on the machine and its load, so it is recorded: :meth:`KSE.recipe_params`
adds ``layer_paths`` (each clustered layer's path, in module order) to the recipe, and a method
built with ``layer_paths`` set (``slimtune replay``) takes those paths instead of timing.
The FLOP counter sees the chosen path's convolutions as they run, so the measured ``macs`` are
the chosen path's and ``Method.cost`` needs to report nothing; ``layer_macs_clustered`` and
``layer_macs_dense`` give both paths' MACs of the KSE layers. On CPU the clustered path runs fewer MACs but more slowly than the dense one
(oneDNN's grouped convolution and the index sum do far less per second than a dense convolution;
``bench/kse_vs_l1.py`` measures it), so ``auto`` mostly keeps the dense path there.

What is approximated or chosen where the paper is silent:

* Eligible layers: every plain ``nn.Conv2d`` with a kernel larger than 1x1 and ``groups == 1``,
  except the layer that reads the raw input (the paper replaces the 3x3 convolutions inside
  residual and dense blocks and leaves the stem and the 1x1 shortcuts alone).
* Top level with ``T > 0``: kept in full; ``T`` halves the counts of the clustered levels only.
* A constant vector min-max normalises to ones (nothing tells its channels apart, so none is
  removed); ``0 log 0 = 0``, and a channel whose kernels all coincide has entropy 0.
* Where a removed channel is also read by another layer (the residual stream of a ResNet), only
  this convolution stops reading it; the channel stays in the network.
* After the upstream removal a layer may have fewer filters ``N'`` than it was decided with; its
  cluster counts use ``N'``.
* ``G = 0`` ("automatic" in the official code) is not offered.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from deploy import eval_mode, latency_ms
from methods._base import Method, MethodContext, NotApplicable
from methods._clustered_conv import ClusteredConv2d, cluster_kernels, index_bits
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import dependency_graph, first_layers, holds_method_layers, loose_parameters, pruning_axes, untold_in
from methods._training import Phase

__all__ = [
    "KSE",
    "KSEConfig",
    "ClusteredConv2d",
    "kernel_sparsity",
    "kernel_entropy",
    "kse_indicator",
    "indicator_levels",
    "cluster_counts",
    "cluster_kernels",
    "index_bits",
    "NEIGHBOURS",
]

#: Nearest neighbours summed in the kernel entropy (the paper's K).
NEIGHBOURS = 5

Path = Literal["auto", "dense", "clustered"]
LayerPath = Literal["dense", "clustered"]


@dataclass(frozen=True)
class KSEConfig:
    levels: int = hyperparameter(
        4,
        "G, levels of the indicator: level 0 removes a channel, G-1 keeps it, the rest cluster it",
        Range(3, 6),
        at_least=2,
        compresses="high",
    )
    halvings: int = hyperparameter(
        0, "T: halves the cluster count of every clustered level T more times", Range(0, 1), at_least=0, compresses="high"
    )
    epochs: int | None = hyperparameter(
        None,
        "epochs of the fine-tune of the centroids and the model; unset (null): the space's budget.epochs",
        Range(1, 30),
        at_least=0,
        budget=True,
    )
    lr: float | None = hyperparameter(
        None, "learning rate of the fine-tune; unset (null): the space's training.lr", Range(1e-4, 0.1, log=True), above=0.0
    )
    path: Path = hyperparameter("auto", "inference path of each clustered layer: auto (the faster, timed at finalize), dense or clustered")
    timing_batch_size: int = hyperparameter(
        1, "batch size at which path auto times both paths (match measure.latency_batch_size)", at_least=1
    )
    layer_paths: tuple[LayerPath, ...] | None = hyperparameter(
        None,
        "path auto's choice for each clustered layer in module order, recorded in the recipe so a replay reuses it; unset (null): time them",
    )


# ----------------------------------------------------------------------------------------------
# Deciding: the indicator and the levels.
# ----------------------------------------------------------------------------------------------


def kernel_sparsity(weight: torch.Tensor) -> torch.Tensor:
    """``s_c``: the L1 norm of the ``N`` kernels that read input channel ``c``; shape ``(C,)``."""
    return weight.detach().abs().sum(dim=(0, 2, 3))


def kernel_entropy(weight: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """``e_c``: the density entropy of the ``N`` kernels that read input channel ``c``; shape ``(C,)``.

    ``dm_n`` sums the Euclidean distances of kernel ``n`` to its ``min(neighbours, N - 1)``
    nearest other kernels; ``e_c = -sum_n p_n log2 p_n`` with ``p_n = dm_n / sum_m dm_m``.
    """
    n, c = weight.shape[:2]
    k = min(neighbours, n - 1)
    if k < 1:
        return weight.new_zeros(c)
    points = weight.detach().transpose(0, 1).reshape(c, n, -1)
    # The matmul form of cdist loses digits on close points; the entropy is compared by hand in tests.
    distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    distances.diagonal(dim1=1, dim2=2).fill_(math.inf)
    density = distances.topk(k, dim=2, largest=False).values.sum(2)
    total = density.sum(1, keepdim=True)
    p = torch.where(total > 0, density / total.clamp_min(torch.finfo(density.dtype).tiny), torch.zeros_like(density))
    terms = torch.where(p > 0, p * torch.log2(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return -terms.sum(1)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    if high - low <= 0:
        return torch.ones_like(x)  # nothing tells the channels apart
    return (x - low) / (high - low)


def kse_indicator(weight: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """``v_c = minmax(sqrt(minmax(s_c) / (1 + minmax(e_c))))`` for every input channel; values in [0, 1]."""
    s = _min_max(kernel_sparsity(weight))
    e = _min_max(kernel_entropy(weight, neighbours))
    return _min_max(torch.sqrt(s / (1 + e)))


def indicator_levels(indicator: torch.Tensor, levels: int) -> list[int]:
    """``floor(v * G)`` per channel, the top value going to level ``G - 1``."""
    return [min(int(math.floor(float(v) * levels)), levels - 1) for v in indicator]


def cluster_counts(num_filters: int, levels: int, halvings: int) -> list[int | None]:
    """What each level keeps of a channel's ``N`` kernels: 0 (removed), ``q`` centroids, or None (all, unclustered).

    ``q_g = ceil(N * 2^(g + 1 - T - G))`` for ``0 < g < G - 1``; a count of ``N`` or more keeps all.
    """
    out: list[int | None] = [0]
    for g in range(1, levels - 1):
        q = math.ceil(num_filters * 2.0 ** (g + 1 - halvings - levels))
        out.append(None if q >= num_filters else max(q, 1))
    if levels > 1:
        out.append(None)
    return out


# ----------------------------------------------------------------------------------------------
# Which layers, and removing channels upstream.
# ----------------------------------------------------------------------------------------------


def eligible_convs(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Plain ``nn.Conv2d`` layers with a kernel larger than 1x1 and ``groups == 1``, except the one reading the input."""
    skip = set(first_layers(model, example_input))
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size != (1, 1) and m.padding_mode == "zeros" and name not in skip
    ]


def batch_norms_after(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> dict[str, str]:
    """``{layer: batch norm}`` for each layer of ``names`` whose output only a ``BatchNorm2d`` with running statistics reads.

    A layer whose output is read elsewhere too (a pre-activation block's shortcut), that runs
    twice, or whose batch norm also reads another layer's output, is left out: folding would
    change what the other reader sees.
    """
    graph = dependency_graph(model, example_input)
    paths = {m: name for name, m in model.named_modules()}
    found = {}
    for name in names:
        node = graph.module2node.get(model.get_submodule(name))
        if node is None or len(node.outputs) != 1:
            continue
        following = node.outputs[0]
        bn = following.module
        if isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and len(following.inputs) == 1 and bn in paths:
            found[name] = paths[bn]
    return found


def _remove_upstream(model: nn.Module, example_input: torch.Tensor, removed: dict[str, list[int]]) -> set[str]:
    """Remove each layer's removed input channels from the layers that produce them, where only that layer reads them.

    Returns:
        The names of the layers whose removed channels are gone from the network.
    """
    loose = loose_parameters(model, example_input)
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example_input, unwrapped_parameters=pruning_axes(loose), verbose=False
    )
    names = {m: name for name, m in model.named_modules()}
    readers = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
    done = set()
    for name, channels in removed.items():
        if not channels:
            continue
        conv = model.get_submodule(name)
        group = graph.get_pruning_group(conv, tp.prune_conv_in_channels, idxs=list(channels))
        others_read = any(dep.handler in readers and dep.target.module is not conv for dep, _ in group)
        produced = any(dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels) for dep, _ in group)
        if others_read or not produced or untold_in(group, loose) is not None or not graph.check_pruning_group(group):
            continue
        group.prune()
        done.add(names[conv])
    return done


# ----------------------------------------------------------------------------------------------
# The method.
# ----------------------------------------------------------------------------------------------


@register_method
class KSE(Method):
    """Kernel sparsity and entropy: removes or clusters each convolution's input channels (arXiv 1812.04368)."""

    name = "kse"
    Config = KSEConfig
    kind = "pruning"
    changes_architecture = True
    applies_to = "Conv2d layers with kernels larger than 1x1 and groups=1 past the first: input channels removed, kernels clustered"
    # kd (which keeps the architecture) may follow; nothing that changes it.
    restructured_only_by = ()
    restructured_only_by_reason = (
        "its clustered convolutions hold the weights as centroids picked by packed indices: pruning and cheap "
        "convolutions cannot trace through them, and minmax_quant and pams would quantize only the plain layers "
        "(the stem and the classifier), leaving the centroids in float"
    )

    def __init__(self, config: KSEConfig | None = None) -> None:
        super().__init__(config)
        self.figures: dict[str, float] = {}
        self.paths: dict[str, str] = {}
        self.batch_norms: dict[str, str] = {}

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Decide every eligible layer's levels from its weights, remove channels, cluster the rest."""
        example = ctx.example_input
        names = eligible_convs(model, example)
        if not names and not holds_method_layers(model):
            raise NotApplicable(
                f"kse clusters Conv2d layers with kernels larger than 1x1 and groups=1 past the first, but {type(model).__name__} "
                "has none (depthwise, 1x1 and patch convolutions are left alone); use l1_filter or minmax_quant."
            )
        levels = {name: indicator_levels(kse_indicator(model.get_submodule(name).weight), self.config.levels) for name in names}
        removed = {name: [c for c, g in enumerate(lv) if g == 0] for name, lv in levels.items()}
        self.batch_norms = batch_norms_after(model, example, names)  # before the removal: names stay, the graph would not
        upstream = _remove_upstream(model, example, removed)
        channels = kept = 0
        for name in names:
            lv = levels[name]
            if name in upstream:  # its removed inputs are gone: the levels of what remains
                lv = [g for g in lv if g != 0]
            conv = model.get_submodule(name)
            counts = cluster_counts(conv.out_channels, self.config.levels, self.config.halvings)
            model.set_submodule(name, ClusteredConv2d.from_conv(conv, [counts[g] for g in lv], ctx.seed))
            channels += len(levels[name])
            kept += sum(1 for g in lv if g != 0)
        self.figures = {
            "kse_layers": float(len(names)),
            "channels_removed_fraction": 1.0 - kept / channels if channels else 0.0,
            "layers_removed_upstream": float(len(upstream)),
        }
        ctx.log(
            f"[kse] {len(names)} layers clustered, {channels - kept} of {channels} input channels removed ({len(upstream)} layers upstream too)"
        )
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        epochs = self.config.epochs if self.config.epochs is not None else ctx.epochs
        return [Phase(name="finetune", epochs=epochs, lr=self.config.lr)]

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Fold the batch norms after the clustered layers into them, pick each layer's inference path (timed when ``path`` is auto), record both paths' MACs."""
        folded = 0
        for layer_name, bn_name in self.batch_norms.items():
            layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
            if isinstance(layer, ClusteredConv2d) and isinstance(bn, nn.BatchNorm2d):
                layer.absorb_batch_norm(bn)
                model.set_submodule(bn_name, nn.Identity())
                folded += 1
        layers = {name: m for name, m in model.named_modules() if isinstance(m, ClusteredConv2d)}
        inputs = _layer_inputs(model, ctx.example_input, layers)
        macs = {"dense": 0, "clustered": 0}
        recorded = self.config.layer_paths
        if self.config.path == "auto" and recorded is not None and len(recorded) != len(layers):
            raise ValueError(
                f"`layer_paths` must name one path per clustered layer ({len(layers)}), but got {len(recorded)}: {list(recorded)}."
            )
        self.paths = {}
        for name, layer in layers.items():
            x, out_pixels = inputs[name]
            for path in macs:
                macs[path] += layer.macs(path, out_pixels)
            if self.config.path == "auto" and recorded is not None:
                layer.path = recorded[len(self.paths)]
            elif self.config.path == "auto":
                shape = (self.config.timing_batch_size, *x.shape[1:])
                layer.path = _faster_path(
                    layer, torch.randn(shape, device=x.device, dtype=x.dtype, generator=_generator(ctx.seed, x.device))
                )
            else:
                layer.path = self.config.path
            self.paths[name] = layer.path
        self.figures.update(
            {
                "batch_norms_folded": float(folded),
                "clustered_path_layers": float(sum(p == "clustered" for p in self.paths.values())),
                "dense_path_layers": float(sum(p == "dense" for p in self.paths.values())),
                "layer_macs_dense": float(macs["dense"]),
                "layer_macs_clustered": float(macs["clustered"]),
            }
        )
        return model

    def metrics(self) -> dict[str, float]:
        return dict(self.figures)

    def recipe_params(self) -> dict[str, Any]:
        """The hyperparameters, with ``layer_paths`` set to the paths finalize chose (once it has run)."""
        params = super().recipe_params()
        if self.config.path == "auto" and self.paths:
            params["layer_paths"] = list(self.paths.values())
        return params

    def state_dict(self) -> dict[str, Any]:
        return {"figures": dict(self.figures), "paths": dict(self.paths), "batch_norms": dict(self.batch_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.figures = dict(state["figures"])
        self.paths = dict(state["paths"])
        self.batch_norms = dict(state.get("batch_norms", {}))  # absent from checkpoints written before the fold


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def _layer_inputs(model: nn.Module, example: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, int]]:
    """Each layer's input on ``example`` and its output's pixel count (one eval pass)."""
    found: dict[str, tuple[torch.Tensor, int]] = {}

    def record(name: str, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        found.setdefault(name, (args[0], out.shape[2] * out.shape[3]))

    handles = [layer.register_forward_hook(functools.partial(record, name)) for name, layer in layers.items()]
    try:
        with eval_mode(model):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _faster_path(layer: ClusteredConv2d, x: torch.Tensor, repeats: int = 5) -> str:
    """``"dense"`` or ``"clustered"``, whichever runs ``layer`` on ``x`` faster (median of ``repeats`` after a warm-up).

    Timed by :func:`deploy.latency_ms`, the trial's timer (eval mode, no grad, synchronised on CUDA).
    """
    times = {}
    for path in ("dense", "clustered"):
        layer.path = path
        times[path] = latency_ms(layer, x, repeats=repeats, warmup=1)
    return min(times, key=times.get)
