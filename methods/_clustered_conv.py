"""The clustered convolution of KSE (:mod:`methods.kse`): kernels as centroids picked by a packed index.

A :class:`ClusteredConv2d` is built from a convolution by :meth:`ClusteredConv2d.from_conv`: per
input channel, the channel is removed, kept in full, or its ``N`` kernels are clustered by
:func:`cluster_kernels` (scikit-learn's ``KMeans``) into ``q`` centroids, each kernel then stored
as a ``ceil(log2 q)``-bit index (:func:`index_bits`) through the bit packer
(:func:`deploy.pack_bits`).

It has two inference paths that compute the same function:

* ``"clustered"``: per group of channels with the same ``q``, one grouped convolution computes
  every (channel, centroid) map once (``C_g * q * k*k`` MACs per output pixel instead of
  ``C_g * N * k*k``); each filter's output is then the sum of its channels' maps picked by index
  (``F.embedding_bag``, ``N * C_g`` additions per pixel, which the FLOP counter lists as
  uncounted work rather than MACs). Full channels use one ordinary convolution.
* ``"dense"``: the weight ``N x C_kept x k x k`` is rebuilt from the centroids by index and one
  convolution runs on the kept channels.

Training always uses the dense path; ``path`` picks the inference one.

A batch norm that reads only the layer's output can be taken into the layer
(:meth:`ClusteredConv2d.absorb_batch_norm`, called by KSE's finalize). In training mode it runs
after the convolution as before (batch statistics, running averages updated), so a fine-tune
after the fold trains what it trained before. In eval mode it is folded: its per-filter scale
``gamma_n / sqrt(var_n + eps)`` and shift go into the weight and the bias, as for a plain
convolution. The scale cannot go into the centroids themselves: a channel's centroids are
shared by all ``N`` filters, each with its own scale, so folding them there would need one
centroid table per filter, that is the dense weight. Hence:

* dense path: the weight is materialised anyway; the scale multiplies it, filter by filter, and
  the shift joins the bias: one convolution, no batch norm (in an exported program this is a
  weight computation, which :func:`deploy.load_program` runs once at load time);
* clustered path: the centroids stay as they are; the full channels' kernels are scaled, and the
  scale weights each filter's sum of picked maps (``F.embedding_bag``'s ``per_sample_weights``,
  no extra pass over the output).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploy import bit_fields, bit_stream, pack_bits

__all__ = ["ClusteredConv2d", "cluster_kernels", "index_bits"]


#: k-means restarts per clustered channel (the paper's code: scikit-learn's default of its day, 10).
KMEANS_RESTARTS = 10


def cluster_kernels(kernels: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``N`` kernels ``(N, k, k)`` into ``q`` centroids (scikit-learn, k-means++, seeded).

    Ten restarts, the best (lowest within-cluster sum of squares) kept, as the paper's code does
    (scikit-learn's default there was ten; today's ``n_init='auto'`` runs k-means++ once).

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
        kmeans = KMeans(n_clusters=q, n_init=KMEANS_RESTARTS, random_state=seed).fit(points)
    centroids = torch.from_numpy(kmeans.cluster_centers_).to(kernels.dtype).reshape(q, *kernels.shape[1:])
    return centroids.to(kernels.device), torch.from_numpy(kmeans.labels_.astype(np.int64)).to(kernels.device)


def index_bits(q: int) -> int:
    """Bits of one index into ``q`` centroids: ``ceil(log2 q)`` (0 for a single centroid)."""
    return max(q - 1, 0).bit_length()


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
    rows ``j*q .. j*q+q-1``). ``indices`` holds, group after group, :func:`deploy.pack_bits` of each
    group's ``N x C_i`` index matrix at ``ceil(log2 q)`` bits (each group's stream padded to whole
    bytes; nothing for ``q == 1``). ``kept`` lists the full channels first, then each group's
    channels. The forward unpacks all groups' indices with one chain of shifts and picks every
    clustered kernel with one gather (few ops: each is a node of the exported program).

    ``batch_norm``: the batch norm that :meth:`absorb_batch_norm` took in (None until then),
    folded in eval mode (module docstring).

    ``params`` counts the centroids, the full kernels, the bias and one weight per index;
    ``size_bytes`` the float tensors at their size, the packed indices byte for byte and ``kept``
    at 32 bits (the convention of ``deploy.size_bytes`` and ``methods._quant``).

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
            raise ValueError(
                f"`kept` names {len(kept)} channels, but the full channels and the groups hold {full_channels + sum(g.channels for g in self.channel_groups)}."
            )
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
        self.register_module("batch_norm", None)  # set by absorb_batch_norm

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, clusters: Sequence[int | None], seed: int) -> ClusteredConv2d:
        """Cluster ``conv``'s kernels: per input channel, 0 removes it, ``q`` clusters it into ``q`` centroids, None keeps it in full.

        Raises:
            ValueError: ``conv`` is grouped, ``clusters`` does not have one entry per input
                channel, a count is outside ``0..N``, or every channel is removed.
        """
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"ClusteredConv2d replaces convolutions with groups=1 and zero padding, but got groups={conv.groups}, padding_mode={conv.padding_mode!r}."
            )
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
            c,
            n,
            conv.kernel_size,
            kept,
            len(full),
            groups,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
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
                streams.append(pack_bits(torch.stack(indices, dim=1), group.bits))
        if streams:
            layer.indices.copy_(torch.cat(streams))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
        return layer

    # --- what it stores ---------------------------------------------------------------------

    def storage_bits(self) -> dict[str, int]:
        """Bits per element of the integer buffers when stored (read by ``deploy.size_bytes``)."""
        return {"kept": 32, "indices": 8}

    def stored_weight_counts(self) -> dict[str, int]:
        """Weights each buffer of :meth:`storage_bits` holds (read by ``deploy.count_params``): an index per (filter, channel)."""
        return {"kept": 0, "indices": self.out_channels * sum(g.channels for g in self.channel_groups if g.bits)}

    def flat_index(self) -> torch.Tensor:
        """``N x C_clustered``: the row of :meth:`centroid_table` that each filter uses on each clustered channel.

        Group ``i``'s channel ``j`` with index ``m`` reads row ``start_i + j * q_i + m``, where
        ``start_i`` is the number of centroids of the groups before it.
        """
        device = self.indices.device
        if any(g.bits for g in self.channel_groups):  # the whole buffer's bits at once: one chain of shifts
            stream = bit_stream(self.indices, torch.int64)
        parts, byte, row = [], 0, 0
        for group, size in zip(self.channel_groups, self.index_bytes):
            rows = torch.arange(row, row + group.channels * group.q, group.q, device=device)
            if group.bits:
                index = bit_fields(stream, group.bits, self.out_channels * group.channels, start=8 * byte)
                parts.append(index.view(self.out_channels, group.channels) + rows)
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

    def absorb_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        """Take ``bn``, which reads this layer's output and nothing else, into the layer (module docstring).

        Called by :meth:`methods.kse.KSE.finalize`, which puts ``nn.Identity`` in ``bn``'s place.
        The layer then computes ``bn(conv(x))``: unfolded in training mode, folded in eval mode.

        Raises:
            ValueError: ``bn`` has no running statistics (it normalises by the batch in eval
                mode too, so nothing can be folded), its size is not the layer's filter count, or
                the layer holds a batch norm already.
        """
        if self.batch_norm is not None:
            raise ValueError("this clustered convolution holds a batch norm already; a second one cannot be folded into it.")
        if bn.running_mean is None or bn.num_features != self.out_channels:
            raise ValueError(
                f"a batch norm folds into a clustered convolution of {self.out_channels} filters when it has running statistics "
                f"and {self.out_channels} features, but got num_features={bn.num_features}, "
                f"track_running_stats={bn.running_mean is not None}."
            )
        self.batch_norm = bn

    def folded_affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(scale, bias)`` per filter with the batch norm (eval mode) folded in; ``(None, self.bias)`` without one.

        ``conv(x) * scale + bias`` equals ``batch_norm(conv(x) + self.bias)`` in eval mode.
        """
        bn = self.batch_norm
        if bn is None:
            return None, self.bias
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        bias = (self.bias - bn.running_mean) * scale if self.bias is not None else -bn.running_mean * scale
        return scale, bias if bn.bias is None else bias + bn.bias

    def folded_dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The dense path's ``(channels, weight, bias)`` in eval mode: the kept channels in ascending order, the weight on them.

        The weight is :meth:`dense_weight` scaled per filter by the folded batch norm, its columns
        in the order of ``channels``: a layer that keeps every channel reads its input as it is.
        """
        scale, bias = self.folded_affine()
        channels, order = torch.sort(self.kept)
        weight = self.dense_weight().index_select(1, order)
        return channels, (weight if scale is None else weight * scale.view(-1, 1, 1, 1)), bias

    def _folded_clustered(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The clustered path's full kernels (scaled), :meth:`flat_index`, the weight of each picked map and the bias."""
        scale, bias = self.folded_affine()
        index = self.flat_index() if self.channel_groups else None
        full = self.weight_full
        if scale is None:
            return full, index, None, bias
        if full is not None:
            full = full * scale.view(-1, 1, 1, 1)
        weights = scale.view(-1, 1).expand(index.shape).contiguous() if index is not None else None
        return full, index, weights, bias

    # --- computing --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.batch_norm
        if self.training or (bn is not None and bn.training):  # the batch norm on batch statistics: not foldable
            x = x if self.reads_input_as_is else self._channels(x, self.kept)
            out = F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)
            return out if bn is None else bn(out)
        if self.path == "dense":
            channels, weight, bias = self._unpacked("dense", self.folded_dense)
            x = x if len(self.kept) == self.in_channels else self._channels(x, channels)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        return self._clustered(x if self.reads_input_as_is else self._channels(x, self.kept))

    @staticmethod
    def _channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """``x``'s ``channels``, in its memory layout.

        ``index_select`` on the channels of a channels-last activation (the inference copy's
        layout on CPU, :func:`deploy.inference_copy`) returns a contiguous one, and oneDNN would
        then reorder at this layer and every layer after it; selecting on the last dimension of
        the channels-last view keeps the layout.
        """
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return x.permute(0, 2, 3, 1).index_select(3, channels).permute(0, 3, 1, 2)
        return x.index_select(1, channels)

    def _unpacked(self, kind: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept between inference calls until a stored tensor changes.

        A deployed model unpacks its indices once when loaded, not on every call; so does this
        layer in eval mode. Training and ``torch.export`` compute from the packed form every time
        (the exported program stores only the packed indices).
        """
        if self.training or torch.is_grad_enabled() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return compute()
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))  # the batch norm's too
        cached = self._cache.get(kind)
        if cached is None or cached[0] != key:
            cached = self._cache[kind] = (key, compute())
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # derived; pickled models (model.pt) hold the packed form only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._modules.setdefault("batch_norm", None)  # pickled before batch norms were folded

    def _clustered(self, x: torch.Tensor) -> torch.Tensor:
        full, index, weights, bias = self._unpacked("clustered", self._folded_clustered)
        out = None
        if full is not None:
            out = F.conv2d(x.narrow(1, 0, self.full_channels), full, None, self.stride, self.padding, self.dilation)
        if self.channel_groups:
            maps, start = [], self.full_channels
            for i, group in enumerate(self.channel_groups):
                maps.append(
                    F.conv2d(
                        x.narrow(1, start, group.channels),
                        getattr(self, f"centroids_{i}"),
                        None,
                        self.stride,
                        self.padding,
                        self.dilation,
                        group.channels,
                    )
                )  # (B, C_i * q, H, W): every (channel, centroid) map once
                start += group.channels
            table = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
            batch, rows, height, width = table.shape
            table = table.transpose(0, 1).reshape(rows, batch * height * width)
            summed = F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)  # (N, B*H*W)
            summed = summed.view(self.out_channels, batch, height, width).transpose(0, 1)
            out = summed if out is None else out + summed
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.channels}x{g.q}" for g in self.channel_groups)
        return (
            f"{self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, kept={len(self.kept)}, "
            f"full={self.full_channels}, clustered=[{groups}], path={self.path}"
            + (", batch norm folded in eval mode" if self.batch_norm is not None else "")
        )
