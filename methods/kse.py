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
kernels are clustered by scikit-learn's ``KMeans`` (k-means++ initialisation, its default number
of restarts, seeded with the trial's seed), and the layer becomes a :class:`ClusteredConv2d` that
stores the centroids, one ``ceil(log2 q)``-bit index per (filter, channel) bit-packed, and the
kept channels' indices. Then a fine-tune trains the centroids, the full kernels and the rest of the
model (the indices stay fixed). All layers are decided at once, from the weights the method
receives (one shot, data-free up to the fine-tune).

:class:`ClusteredConv2d` has two inference paths that compute the same function:

* ``"clustered"``: per group of channels with the same ``q``, one grouped convolution computes
  every (channel, centroid) map once (``C_g * q * k*k`` MACs per output pixel instead of
  ``C_g * N * k*k``); each filter's output is then the sum of its channels' maps picked by index
  (``F.embedding_bag``, ``N * C_g`` additions per pixel, which the FLOP counter lists as
  uncounted work rather than MACs). Full channels use one ordinary convolution.
* ``"dense"``: the weight ``N x C_kept x k x k`` is rebuilt from the centroids by index and one
  convolution runs on the kept channels.

Training always uses the dense path. Finalize times both paths of each layer on its own input
shape (``timing_batch_size``) and keeps the faster (``path: auto``), unless ``path`` forces one;
the method's metrics say how many layers took which. The FLOP counter sees the chosen path's
convolutions as they run, so the measured ``macs`` are the chosen path's and ``Method.cost``
needs to report nothing; ``layer_macs_clustered`` and ``layer_macs_dense`` give both paths' MACs
of the KSE layers. On CPU the clustered path runs fewer MACs but more slowly than the dense one
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
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from methods._base import Method, MethodContext
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import first_layers
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
    "pack_indices",
    "unpack_indices",
    "index_bits",
    "NEIGHBOURS",
]

#: Nearest neighbours summed in the kernel entropy (the paper's K).
NEIGHBOURS = 5

Path = Literal["auto", "dense", "clustered"]


@dataclass(frozen=True)
class KSEConfig:
    levels: int = hyperparameter(4, "G, levels of the indicator: level 0 removes a channel, G-1 keeps it, the rest cluster it", Range(3, 6), at_least=2, compresses="high")
    halvings: int = hyperparameter(0, "T: halves the cluster count of every clustered level T more times", Range(0, 1), at_least=0, compresses="high")
    epochs: int | None = hyperparameter(None, "epochs of the fine-tune of the centroids and the model; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True)
    lr: float | None = hyperparameter(None, "learning rate of the fine-tune; unset (null): the space's training.lr", Range(1e-4, 0.1, log=True), above=0.0)
    path: Path = hyperparameter("auto", "inference path of each clustered layer: auto (the faster, timed at finalize), dense or clustered")
    timing_batch_size: int = hyperparameter(1, "batch size at which path auto times both paths (match measure.latency_batch_size)", at_least=1)


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
# Doing: k-means, packed indices, the clustered convolution.
# ----------------------------------------------------------------------------------------------


def cluster_kernels(kernels: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``N`` kernels ``(N, k, k)`` into ``q`` centroids (scikit-learn, k-means++, seeded).

    Returns:
        ``(centroids (q, k, k), index (N,) int64)``; kernel ``n`` belongs to centroid ``index[n]``.
    """
    from sklearn.cluster import KMeans

    n = kernels.shape[0]
    if not 1 <= q <= n:
        raise ValueError(f"`1 <= q <= N` must hold to cluster {n} kernels, but got q={q}.")
    points = kernels.detach().reshape(n, -1).double().cpu().numpy()
    with warnings.catch_warnings():
        # Fewer distinct kernels than clusters: k-means still returns q centroids (some repeated).
        warnings.simplefilter("ignore")
        kmeans = KMeans(n_clusters=q, random_state=seed).fit(points)
    centroids = torch.from_numpy(kmeans.cluster_centers_).to(kernels.dtype).reshape(q, *kernels.shape[1:])
    return centroids.to(kernels.device), torch.from_numpy(kmeans.labels_.astype(np.int64)).to(kernels.device)


def index_bits(q: int) -> int:
    """Bits of one index into ``q`` centroids: ``ceil(log2 q)`` (0 for a single centroid)."""
    return max(q - 1, 0).bit_length()


def pack_indices(index: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers below ``2^bits`` as a flat little-endian bit stream of ``uint8`` bytes.

    Index ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of the stream, bit ``j`` of the stream is
    bit ``j % 8`` of byte ``j // 8`` (the layout of ``methods._quant.pack_codes``); ``n`` indices
    take ``ceil(n * bits / 8)`` bytes.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"`1 <= bits <= 16` must hold, but got bits={bits}.")
    flat = index.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"indices must lie in 0..{2**bits - 1} for {bits} bits, but got {int(flat.min())}..{int(flat.max())}.")
    stream = ((flat.unsqueeze(1) >> torch.arange(bits, device=flat.device)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: the first ``numel`` indices, ``int64``. Shifts and masks only (exportable)."""
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    fields = stream.reshape(-1)[: numel * bits].reshape(numel, bits)
    return (fields << torch.arange(bits, device=packed.device)).sum(1)


@dataclass(frozen=True)
class _Group:
    """Input channels clustered with the same number of centroids."""

    q: int
    channels: int

    @property
    def bits(self) -> int:
        return index_bits(self.q)


class ClusteredConv2d(nn.Module):
    """A convolution whose kernels, per input channel, are centroids picked by a packed index.

    Stored: ``kept`` (int32, the kept input channels in the order below), ``weight_full``
    (``N x C_full x k x k``, the channels kept in full), and per group ``i`` of channels sharing a
    centroid count ``q``: ``centroids_i`` (``C_i * q x 1 x k x k``, channel ``j``'s centroids are
    rows ``j*q .. j*q+q-1``). ``indices`` holds, group after group, :func:`pack_indices` of each
    group's ``N x C_i`` index matrix at ``ceil(log2 q)`` bits (each group's stream padded to whole
    bytes; nothing for ``q == 1``). ``kept`` lists the full channels first, then each group's
    channels. The forward unpacks all groups' indices with one chain of shifts and picks every
    clustered kernel with one gather (few ops: each is a node of the exported program).

    ``params`` counts the centroids, the full kernels, the bias and one weight per index;
    ``size_bytes`` the float tensors at their size, the packed indices byte for byte and ``kept``
    at 32 bits (the convention of ``search.measure`` and ``methods._quant``).

    Build with :meth:`from_conv`. ``path`` (``"dense"`` or ``"clustered"``) picks the inference
    computation (module docstring); training always runs the dense path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        kept: torch.Tensor,
        full_channels: int,
        groups: Sequence[_Group],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        bias: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.full_channels = full_channels
        self.channel_groups = tuple(groups)
        self.path = "dense"
        self._cache: dict[str, tuple[tuple[tuple[int, int], ...], Any]] = {}
        if len(kept) != full_channels + sum(g.channels for g in self.channel_groups):
            raise ValueError(f"`kept` names {len(kept)} channels, but the full channels and the groups hold {full_channels + sum(g.channels for g in self.channel_groups)}.")
        self.register_buffer("kept", kept.to(device=device, dtype=torch.int32))
        # Reading the input as it is when every channel is kept in order saves a copy.
        self.reads_input_as_is = len(kept) == in_channels and bool((kept.cpu() == torch.arange(in_channels)).all())
        kh, kw = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight_full = nn.Parameter(torch.zeros(out_channels, full_channels, kh, kw, **factory)) if full_channels else None
        for i, group in enumerate(self.channel_groups):
            self.register_parameter(f"centroids_{i}", nn.Parameter(torch.zeros(group.channels * group.q, 1, kh, kw, **factory)))
        self.index_bytes = [math.ceil(out_channels * g.channels * g.bits / 8) for g in self.channel_groups]
        self.register_buffer("indices", torch.zeros(sum(self.index_bytes), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, clusters: Sequence[int | None], seed: int) -> ClusteredConv2d:
        """Cluster ``conv``'s kernels: per input channel, 0 removes it, ``q`` clusters it into ``q`` centroids, None keeps it in full.

        Raises:
            ValueError: ``conv`` is grouped, ``clusters`` does not have one entry per input
                channel, a count is outside ``0..N``, or every channel is removed.
        """
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"ClusteredConv2d replaces convolutions with groups=1 and zero padding, but got groups={conv.groups}, padding_mode={conv.padding_mode!r}.")
        n, c = conv.out_channels, conv.in_channels
        if len(clusters) != c:
            raise ValueError(f"`clusters` needs one entry per input channel ({c}), but got {len(clusters)}.")
        for q in clusters:
            if q is not None and not 0 <= q <= n:
                raise ValueError(f"a cluster count must lie in 0..{n} (the filters) or be None (keep all), but got {q}.")
        if all(q == 0 for q in clusters):
            raise ValueError("every input channel would be removed; keep at least one.")
        full = [ch for ch, q in enumerate(clusters) if q is None]
        counts = sorted({q for q in clusters if q})
        members = {q: [ch for ch, qc in enumerate(clusters) if qc == q] for q in counts}
        groups = [_Group(q, len(members[q])) for q in counts]
        kept = torch.tensor(full + [ch for q in counts for ch in members[q]], dtype=torch.int64)
        weight = conv.weight.detach()
        layer = cls(
            c, n, conv.kernel_size, kept, len(full), groups, conv.stride, conv.padding, conv.dilation, conv.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        if full:
            layer.weight_full.copy_(weight[:, full])
        streams = []
        for i, group in enumerate(groups):
            centroids, indices = [], []
            for ch in members[group.q]:
                center, index = cluster_kernels(weight[:, ch], group.q, seed)
                centroids.append(center)
                indices.append(index)
            getattr(layer, f"centroids_{i}").copy_(torch.cat(centroids).unsqueeze(1))
            if group.bits:
                streams.append(pack_indices(torch.stack(indices, dim=1), group.bits))
        if streams:
            layer.indices.copy_(torch.cat(streams))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
        return layer

    # --- what it stores ---------------------------------------------------------------------

    def storage_bits(self) -> dict[str, int]:
        """Bits per element of the integer buffers when stored (read by ``search.measure.size_bytes``)."""
        return {"kept": 32, "indices": 8}

    def stored_weight_counts(self) -> dict[str, int]:
        """Weights each buffer of :meth:`storage_bits` holds (read by ``search.measure.count_params``): an index per (filter, channel)."""
        return {"kept": 0, "indices": self.out_channels * sum(g.channels for g in self.channel_groups if g.bits)}

    def flat_index(self) -> torch.Tensor:
        """``N x C_clustered``: the row of :meth:`centroid_table` that each filter uses on each clustered channel.

        Group ``i``'s channel ``j`` with index ``m`` reads row ``start_i + j * q_i + m``, where
        ``start_i`` is the number of centroids of the groups before it.
        """
        device = self.indices.device
        if any(g.bits for g in self.channel_groups):  # the whole buffer's bits, least significant first
            bits = ((self.indices.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=device)) & 1).reshape(-1)
        parts, byte, row = [], 0, 0
        for group, size in zip(self.channel_groups, self.index_bytes):
            rows = torch.arange(row, row + group.channels * group.q, group.q, device=device)
            if group.bits:
                fields = bits[8 * byte : 8 * byte + self.out_channels * group.channels * group.bits].view(-1, group.bits)
                index = (fields << torch.arange(group.bits, device=device)).sum(1).view(self.out_channels, group.channels)
                parts.append(index + rows)
            else:
                parts.append(rows.expand(self.out_channels, group.channels))
            byte += size
            row += group.channels * group.q
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def centroid_table(self) -> torch.Tensor:
        """Every group's centroids, one after the other: ``sum_i C_i * q_i x 1 x k x k``."""
        tables = [getattr(self, f"centroids_{i}") for i in range(len(self.channel_groups))]
        return tables[0] if len(tables) == 1 else torch.cat(tables)

    def dense_weight(self) -> torch.Tensor:
        """The ``N x C_kept x k x k`` weight on the kept channels (in ``kept``'s order), rebuilt by index."""
        parts = [self.weight_full] if self.weight_full is not None else []
        if self.channel_groups:
            parts.append(self.centroid_table().squeeze(1)[self.flat_index()])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def macs(self, path: str, out_pixels: int) -> int:
        """Multiply-accumulates of ``path`` for one sample whose output has ``out_pixels`` pixels."""
        kernel = self.kernel_size[0] * self.kernel_size[1]
        if path == "dense":
            return out_pixels * self.out_channels * len(self.kept) * kernel
        clustered = sum(g.channels * g.q for g in self.channel_groups)
        return out_pixels * kernel * (self.out_channels * self.full_channels + clustered)

    # --- computing --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reads_input_as_is:
            x = x.index_select(1, self.kept)
        if self.training or self.path == "dense":
            return F.conv2d(x, self._unpacked("dense", self.dense_weight), self.bias, self.stride, self.padding, self.dilation)
        return self._clustered(x)

    def _unpacked(self, kind: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept between inference calls until a stored tensor changes.

        A deployed model unpacks its indices once when loaded, not on every call; so does this
        layer in eval mode. Training and ``torch.export`` compute from the packed form every time
        (the exported program stores only the packed indices).
        """
        if self.training or torch.is_grad_enabled() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return compute()
        key = tuple((t.data_ptr(), t._version) for t in (*self._parameters.values(), *self._buffers.values()) if t is not None)
        cached = self._cache.get(kind)
        if cached is None or cached[0] != key:
            cached = self._cache[kind] = (key, compute())
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # derived; pickled models (model.pt) hold the packed form only
        return state

    def _clustered(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.weight_full is not None:
            out = F.conv2d(x.narrow(1, 0, self.full_channels), self.weight_full, None, self.stride, self.padding, self.dilation)
        if self.channel_groups:
            maps, start = [], self.full_channels
            for i, group in enumerate(self.channel_groups):
                maps.append(F.conv2d(
                    x.narrow(1, start, group.channels), getattr(self, f"centroids_{i}"), None,
                    self.stride, self.padding, self.dilation, group.channels,
                ))  # (B, C_i * q, H, W): every (channel, centroid) map once
                start += group.channels
            table = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
            batch, rows, height, width = table.shape
            table = table.transpose(0, 1).reshape(rows, batch * height * width)
            summed = F.embedding_bag(self._unpacked("index", self.flat_index), table, mode="sum")  # (N, B*H*W)
            summed = summed.view(self.out_channels, batch, height, width).transpose(0, 1)
            out = summed if out is None else out + summed
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.channels}x{g.q}" for g in self.channel_groups)
        return (
            f"{self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, kept={len(self.kept)}, "
            f"full={self.full_channels}, clustered=[{groups}], path={self.path}"
        )


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


def _remove_upstream(model: nn.Module, example_input: torch.Tensor, removed: dict[str, list[int]]) -> set[str]:
    """Remove each layer's removed input channels from the layers that produce them, where only that layer reads them.

    Returns:
        The names of the layers whose removed channels are gone from the network.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
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
        if others_read or not produced or not graph.check_pruning_group(group):
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
    # Pruning and cheap-convolution methods find their layers by type and trace channels with
    # torch-pruning, which cannot see through a ClusteredConv2d; quantization and kd can follow.
    restructured_only_by = ("quantization",)

    def __init__(self, config: KSEConfig | None = None) -> None:
        super().__init__(config)
        self.figures: dict[str, float] = {}
        self.paths: dict[str, str] = {}

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Decide every eligible layer's levels from its weights, remove channels, cluster the rest."""
        example = ctx.example_input
        names = eligible_convs(model, example)
        levels = {name: indicator_levels(kse_indicator(model.get_submodule(name).weight), self.config.levels) for name in names}
        removed = {name: [c for c, g in enumerate(lv) if g == 0] for name, lv in levels.items()}
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
        ctx.log(f"[kse] {len(names)} layers clustered, {channels - kept} of {channels} input channels removed ({len(upstream)} layers upstream too)")
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        epochs = self.config.epochs if self.config.epochs is not None else ctx.epochs
        return [Phase(name="finetune", epochs=epochs, lr=self.config.lr)]

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Pick each clustered layer's inference path (timed when ``path`` is auto) and record both paths' MACs."""
        layers = {name: m for name, m in model.named_modules() if isinstance(m, ClusteredConv2d)}
        inputs = _layer_inputs(model, ctx.example_input, layers)
        macs = {"dense": 0, "clustered": 0}
        self.paths = {}
        for name, layer in layers.items():
            x, out_pixels = inputs[name]
            for path in macs:
                macs[path] += layer.macs(path, out_pixels)
            if self.config.path == "auto":
                shape = (self.config.timing_batch_size, *x.shape[1:])
                layer.path = _faster_path(layer, torch.randn(shape, device=x.device, dtype=x.dtype, generator=_generator(ctx.seed, x.device)))
            else:
                layer.path = self.config.path
            self.paths[name] = layer.path
        self.figures.update(
            {
                "clustered_path_layers": float(sum(p == "clustered" for p in self.paths.values())),
                "dense_path_layers": float(sum(p == "dense" for p in self.paths.values())),
                "layer_macs_dense": float(macs["dense"]),
                "layer_macs_clustered": float(macs["clustered"]),
            }
        )
        return model

    def metrics(self) -> dict[str, float]:
        return dict(self.figures)

    def state_dict(self) -> dict[str, Any]:
        return {"figures": dict(self.figures), "paths": dict(self.paths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.figures = dict(state["figures"])
        self.paths = dict(state["paths"])


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def _layer_inputs(model: nn.Module, example: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, int]]:
    """Each layer's input on ``example`` and its output's pixel count (one eval pass)."""
    found: dict[str, tuple[torch.Tensor, int]] = {}

    def record(name: str, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        found.setdefault(name, (args[0], out.shape[2] * out.shape[3]))

    handles = [layer.register_forward_hook(functools.partial(record, name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


@torch.no_grad()
def _faster_path(layer: ClusteredConv2d, x: torch.Tensor, repeats: int = 5) -> str:
    """``"dense"`` or ``"clustered"``, whichever runs ``layer`` on ``x`` faster (median of ``repeats`` after a warm-up)."""
    was_training = layer.training
    layer.eval()
    times = {}
    try:
        for path in ("dense", "clustered"):
            layer.path = path
            runs = []
            for _ in range(repeats + 1):  # the first is a warm-up
                _synchronize(x.device)
                start = time.perf_counter()
                layer(x)
                _synchronize(x.device)
                runs.append(time.perf_counter() - start)
            runs = runs[1:]
            times[path] = statistics.median(runs)
    finally:
        layer.train(was_training)
    return min(times, key=times.get)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
