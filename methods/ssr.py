"""SSR: structured-sparsity filter pruning solved by AULM (Lin et al., IEEE TNNLS 2020).

"Towards Compact ConvNets via Structure-Sparsity Regularized Filter Pruning", arXiv 1901.07827;
written from the paper's description, not from the official code (TensorFlow 1, LeNet/MNIST and
L2,1 only, no license). This version works on any CNN torch-pruning can trace (CIFAR ResNets, VGG,
digits models, torchvision ResNets) and has both regularisers.

Objective: ``min_W L(W) + sum_l lam_l R(W_l)`` where every **group** is one output channel: the row
of its convolution or linear layer (weights and bias), and the channel's batch-norm scale and shift.
Channels that torch-pruning's dependency graph couples (the outputs of every convolution feeding
one residual addition, an option-A shortcut's padded channels) are one group, since they can only be
removed together. Channels coupled to the classifier's outputs, or to a module whose parameters
are not per output channel (anything but convolutions, linear layers and affine batch norms), are in
no group and stay. ``variant: l21`` is the group lasso ``R = sum_i ||W_i||``, ``variant: l20``
counts the non-zero groups ``R = #{i : W_i != 0}``.

AULM (alternative updating with Lagrange multipliers, an ADMM splitting) keeps an auxiliary copy F
of the grouped weights and multipliers Y, both owned by the method (saved by :meth:`SSR.state_dict`,
never in the model):

* W-step, every iteration: SGD on the task loss + ``(rho/2) ||W - F + Y/rho||^2`` (the AULM
  phase's own loss; every other loss term that reaches the phase, as kd's, adds to it);
* F-step, every ``update_period`` (K) iterations: the proximal operator of ``lam R`` (``lam`` is
  the layer's ``lam_l``, below) at ``T = W + Y/rho``, group by group (:func:`group_prox`): L2,1
  soft-thresholds
  ``F_i = max(||T_i|| - lam/rho, 0) T_i/||T_i||``; L2,0 hard-thresholds, keeping ``T_i`` when
  ``||T_i||^2 > 2 lam/rho`` and zeroing it otherwise;
* Y-step, right after: ``Y <- Y + rho (W - F)``.

F starts as W and Y as zero. When the AULM phase ends the groups whose F is zero are masked: their
weights in W are set to zero, which is the "masked model"; if the phase's last iteration was not
an F-step, one F-step runs first so the mask reflects the final W.

Schedules: ``global`` runs one AULM phase over every layer at once. ``layerwise`` is the official
code's: one AULM phase per layer (a set of coupled modules: a conv with its batch norm, or every
module on one residual stream), during which only that layer's parameters train, each followed by
a fine-tune of the whole network (``layer_finetune_epochs``) with the masks so far fixed (masked
weights are reset to zero after every step). Finalize then removes every zero group physically
with torch-pruning, with everything coupled to it (the next layers' input channels), and a
labelled fine-tune (``finetune_epochs``) of the smaller network follows: nothing is masked any more,
so the mask stays fixed. The model holds no mask, F or Y at any time.

Choices and approximations, and why:

* Batch norm in the group: with a batch norm after a convolution, a zero filter still yields the
  channel's shift ``beta - gamma mean / std``, a constant the next layer reads. Grouping gamma and
  beta with the filter lets AULM drive that constant to zero too, so removal changes nothing (the
  paper's LeNet has no batch norm).
* One ``lam``, scaled per layer (the paper tunes one lambda per layer: 0.4, 0.15, 0.02 on LeNet's
  conv1, conv2, fc1): with ``s_l`` the layer's mean group norm when its AULM starts, L2,1 uses
  ``lam_l = lam s_l`` and L2,0 ``lam_l = lam s_l^2``, so one value suits layers of any width and
  scale in both variants. The first F-step (Y = 0) then zeroes the groups with
  ``||W_i|| / s_l <= lam / rho`` (L2,1) or ``||W_i|| / s_l <= sqrt(2 lam / rho)`` (L2,0): a cut
  relative to the layer's own scale, so a layer whose weights are 10x smaller loses the same
  groups (L2,0 thresholds the *squared* norm, so ``lam s_l`` would prune small-weight layers
  harder). Later F-steps differ more: the L2,1 multipliers of the surviving groups settle at
  ``lam_l`` times their direction, a pull towards zero that only a loss gradient of that size
  resists, while L2,0 resets them to zero. On digits_lenet (15 AULM epochs) L2,1 reaches about 2x
  fewer MACs at ``lam`` 0.15 and 4x at 0.2; L2,0 needs about twice the ``lam`` (4.7x at 0.5,
  measured with ``lam s_l``; ``s_l`` is 0.8-1.0 on that model, so ``lam s_l^2`` moves it little).
* Batch norm after a convolution makes the convolution's weights scale-invariant: shrinking a
  filter changes nothing the batch norm does not undo, so the task loss offers no resistance to
  the group penalty in those weights, and whether a group survives rests on the batch-norm scale
  ``gamma`` (and shift) in the same group. The penalty then acts as a network-slimming-style
  penalty on ``gamma`` with the filter pulled along; the paper's LeNet has no batch norm.
  ``bench/ssr_vs_l1.py --model digits_cnn`` measures one batch-norm model.
* The L2,0 constant ``2 lam/rho``: it is the exact proximal point of
  ``lam 1[F_i != 0] + (rho/2) ||F_i - T_i||^2``: keeping ``T_i`` costs ``lam``, zeroing it costs
  ``(rho/2) ||T_i||^2``; ``T_i`` is kept when the second is larger.
* ``update_period`` defaults to 20 iterations (the paper's K = 200 comes with 8000-iteration AULM
  phases; our trials are far shorter). Much shorter periods make AULM oscillate: the W-steps between
  two Y-steps must move W most of the way to ``F - Y/rho``, or the multipliers of a zeroed group
  keep growing and revive it (seen on digits with K = 4 at lr 0.05: the zero set changed at every
  F-step and accuracy fell to chance). The learning rate follows the loop's cosine schedule rather
  than the paper's constant 0.01.
* A module keeps at least one output channel (all zero) when every group it belongs to is zero,
  so shapes stay valid and the function is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from deploy import eval_mode
from methods._base import Method, MethodContext, NotApplicable, Touches
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import dependency_graph, output_layers, shared_layers
from methods._training import Phase, Step

__all__ = ["SSR", "SSRConfig", "Layer", "find_layers", "group_norms", "group_prox", "remove_zero_groups"]

Variant = Literal["l21", "l20"]
Schedule = Literal["global", "layerwise"]


@dataclass(frozen=True)
class SSRConfig:
    lam: float = hyperparameter(
        0.2,
        "regularisation weight lambda, times each layer's mean filter norm s (l21) or s^2 (l20): one value, scaled per layer",
        Range(0.05, 1.0, log=True),
        at_least=0.0,
        compresses="high",
    )
    rho: float = hyperparameter(
        1.0,
        "AULM penalty rho: W-step term (rho/2)||W - F + Y/rho||^2, F-step threshold lam/rho",
        Range(0.5, 5.0, log=True),
        above=0.0,
        compresses="low",
    )
    update_period: int = hyperparameter(
        20, "K: iterations between F- and Y-steps (much shorter periods oscillate)", Range(10, 200, log=True), at_least=1, compresses="low"
    )
    variant: Variant = hyperparameter(
        "l21", "regulariser: l21 (group lasso, soft threshold) or l20 (group count, hard threshold)", Range(choices=("l21", "l20"))
    )
    schedule: Schedule = hyperparameter(
        "global",
        "global (all layers in one AULM phase) or layerwise (one layer at a time, each followed by a fine-tune)",
        Range(choices=("global", "layerwise")),
    )
    aulm_epochs: int | None = hyperparameter(
        None, "epochs of each AULM phase; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True
    )
    layer_finetune_epochs: int = hyperparameter(
        1, "layerwise: epochs of the fine-tune after each layer's AULM, its mask fixed", Range(0, 10), at_least=0, budget=True
    )
    finetune_epochs: int | None = hyperparameter(
        None,
        "epochs of the labelled fine-tune after removal; unset (null): the space's budget.epochs",
        Range(0, 30),
        at_least=0,
        budget=True,
    )
    lr: float | None = hyperparameter(
        None,
        "learning rate of the AULM phases and layer fine-tunes; unset (null): the space's training.lr",
        Range(1e-3, 0.1, log=True),
        above=0.0,
    )
    finetune_lr: float | None = hyperparameter(
        None, "learning rate of the fine-tune after removal; unset (null): the space's training.lr", Range(1e-3, 0.1, log=True), above=0.0
    )


# ----------------------------------------------------------------------------------------------
# Deciding: which channels form a group, the proximal step.
# ----------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """Coupled modules whose output channels SSR groups, and the AULM state of their groups.

    Attributes:
        name: The first module's name (logs, phase names).
        params: Names of the grouped parameters (weights and biases of convolutions, linear
            layers and batch norms), each grouped along its first dimension.
        rows: For each parameter, the indices along dimension 0 that belong to a group.
        group_of_row: For each parameter, the group (``0 .. groups-1``) of each of its ``rows``.
        groups: Number of groups.
        lam: The layer's regularisation weight ``lam_l`` (None before its AULM starts).
        f: The auxiliary variable, one tensor per parameter (its ``rows``); None outside AULM.
        y: The multipliers, shaped as ``f``.
        zero: After the layer's AULM, which groups are masked (True: zero, to be removed).
    """

    name: str
    params: list[str]
    rows: list[torch.Tensor]
    group_of_row: list[torch.Tensor]
    groups: int
    lam: float | None = None
    f: list[torch.Tensor] | None = None
    y: list[torch.Tensor] | None = None
    zero: torch.Tensor | None = None

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        """The grouped rows of each parameter of ``model`` (a view when a parameter is wholly grouped)."""
        out = []
        for name, rows in zip(self.params, self.rows):
            p = model.get_parameter(name)
            out.append(p if rows.numel() == p.shape[0] else p.index_select(0, rows))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "params", "rows", "group_of_row", "groups", "lam", "f", "y", "zero")}


_GROUPED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _groupable(module: Any) -> bool:
    """A module whose output-channel parameters SSR knows how to group (all along dimension 0)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.affine
    return isinstance(module, _GROUPED)


def find_layers(model: nn.Module, example_input: torch.Tensor) -> list[Layer]:
    """The groups of ``model``: every output channel of its convolutions and linear layers but the classifier's.

    Channels that torch-pruning's dependency graph couples are one group. A group is left out when
    it is coupled to the classifier's outputs or to a module whose parameters are not grouped along
    their first dimension (anything but convolutions, linear layers and affine batch norms). Layers
    are the sets of modules that share groups, in the model's module order.
    """
    graph = dependency_graph(model, example_input)
    classifier = set(output_layers(model, example_input))
    names = {module: name for name, module in model.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    blocked: set[tuple[str, int]] = set()
    for name, module in model.named_modules():
        if not isinstance(module, _GROUPED) or name in classifier or module not in graph.module2node:
            continue
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        width = module.weight.shape[0]
        group = graph.get_pruning_group(module, fn, idxs=list(range(width)))
        for item in group:
            dep = item.dep
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            target = dep.target.module
            if (
                isinstance(target, nn.Module)
                and not isinstance(target, nn.Parameter)
                and not any(True for _ in target.parameters(recurse=False))
            ):
                continue  # an activation, a pooling, an addition: nothing to group
            target_name = names.get(target) if isinstance(target, nn.Module) else None
            root_idxs = getattr(item, "root_idxs", None)
            if root_idxs is None or any(r is None for r in root_idxs):
                blocked.update((name, c) for c in range(width))
                continue
            usable = target_name is not None and target_name not in classifier and _groupable(target)
            for idx, root in zip(item.idxs, root_idxs):
                if usable:
                    parent[find((target_name, idx))] = find((name, root))
                else:
                    blocked.add((name, root))
    blocked_roots = {find(x) for x in blocked}
    components: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for x in list(parent):
        root = find(x)
        if root not in blocked_roots:
            components.setdefault(root, []).append(x)
    # Modules that share a group form one layer (union-find over module names).
    module_parent: dict[str, str] = {}

    def find_module(m: str) -> str:
        module_parent.setdefault(m, m)
        while module_parent[m] != m:
            m = module_parent[m] = module_parent[module_parent[m]]
        return m

    for members in components.values():
        first = members[0][0]
        for module_name, _ in members:
            module_parent[find_module(module_name)] = find_module(first)
    by_layer: dict[str, list[list[tuple[str, int]]]] = {}
    for members in components.values():
        by_layer.setdefault(find_module(members[0][0]), []).append(sorted(members, key=lambda x: (order[x[0]], x[1])))
    layers = []
    for groups in by_layer.values():
        groups.sort(key=lambda members: (order[members[0][0]], members[0][1]))
        channels: dict[str, dict[int, int]] = {}
        for g, members in enumerate(groups):
            for module_name, idx in members:
                channels.setdefault(module_name, {})[idx] = g
        params, rows, group_of_row = [], [], []
        for module_name in sorted(channels, key=order.__getitem__):
            module = model.get_submodule(module_name)
            owned = sorted(channels[module_name].items())
            for pname, p in module.named_parameters(recurse=False):
                params.append(f"{module_name}.{pname}")
                rows.append(torch.tensor([i for i, _ in owned], dtype=torch.long, device=p.device))
                group_of_row.append(torch.tensor([g for _, g in owned], dtype=torch.long, device=p.device))
        name = min(channels, key=order.__getitem__)
        layers.append(Layer(name, params, rows, group_of_row, len(groups)))
    layers.sort(key=lambda layer: order[layer.name])
    return layers


def group_norms(tensors: list[torch.Tensor], group_of_row: list[torch.Tensor], groups: int) -> torch.Tensor:
    """The L2 norm of each group: rows of ``tensors`` are summed into the group ``group_of_row`` names."""
    squares = torch.zeros(groups, device=tensors[0].device, dtype=tensors[0].dtype)
    for t, g in zip(tensors, group_of_row):
        squares.index_add_(0, g, t.reshape(t.shape[0], -1).pow(2).sum(1))
    return squares.sqrt()


def group_prox(
    tensors: list[torch.Tensor], group_of_row: list[torch.Tensor], groups: int, variant: str, lam: float, rho: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The proximal point of ``lam R`` at ``tensors`` with step ``1/rho``, group by group.

    Returns:
        ``(F, zero)``: F shaped as ``tensors``; ``zero`` marks the groups set to exactly zero.
        ``l21``: ``F_i = max(||T_i|| - lam/rho, 0) T_i/||T_i||``. ``l20``: ``F_i = T_i`` when
        ``||T_i||^2 > 2 lam/rho``, else 0.
    """
    norms = group_norms(tensors, group_of_row, groups)
    if variant == "l21":
        factor = (1.0 - (lam / rho) / norms.clamp_min(1e-30)).clamp_min(0.0)
    elif variant == "l20":
        factor = (norms.pow(2) > 2.0 * lam / rho).to(norms.dtype)
    else:
        raise ValueError(f"variant must be 'l21' or 'l20', but got {variant!r}.")
    out = [t * factor[g].view(-1, *([1] * (t.dim() - 1))) for t, g in zip(tensors, group_of_row)]
    return out, factor == 0


# ----------------------------------------------------------------------------------------------
# Doing: mask, remove.
# ----------------------------------------------------------------------------------------------


def apply_mask(model: nn.Module, layer: Layer) -> None:
    """Set the parameters of ``layer``'s zero groups to zero in ``model``."""
    if layer.zero is None or not bool(layer.zero.any()):
        return
    with torch.no_grad():
        for name, rows, g in zip(layer.params, layer.rows, layer.group_of_row):
            p = model.get_parameter(name)
            p.index_fill_(0, rows[layer.zero.to(g.device)[g]], 0.0)


def remove_zero_groups(model: nn.Module, layers: list[Layer], example_input: torch.Tensor) -> int:
    """Physically remove every zero group (and all that is coupled to it) with torch-pruning.

    A module whose groups are all zero keeps one (all-zero) channel so its shapes stay valid.
    Returns the number of groups removed. ``model`` changes in place.
    """
    plans = []  # per layer: the channels of each group to remove, by module
    for layer in layers:
        if layer.zero is None:
            continue
        channels: dict[int, dict[str, list[int]]] = {}
        counts: dict[str, int] = {}
        for name, rows, g in zip(layer.params, layer.rows, layer.group_of_row):
            module_name, _, pname = name.rpartition(".")
            if pname != "weight":
                continue
            counts[module_name] = model.get_submodule(module_name).weight.shape[0]
            for idx, group in zip(rows.tolist(), g.tolist()):
                channels.setdefault(group, {}).setdefault(module_name, []).append(idx)
        removed = [int(g) for g in layer.zero.nonzero().flatten().tolist()]
        for module_name, total in counts.items():
            gone = [g for g in removed if module_name in channels[g]]
            if sum(len(channels[g][module_name]) for g in gone) >= total:
                removed.remove(gone[0])
        plans.append([channels[g] for g in removed])
    groups = [group for plan in plans for group in plan]
    if not groups:
        return 0
    graph = dependency_graph(model, example_input)
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    alive = {
        name: list(range(m.weight.shape[0])) for name, m in modules.items() if _groupable(m) and getattr(m, "weight", None) is not None
    }
    # Batch the groups by a representative convolution or linear layer, pruned in one call each.
    batches: dict[str, list[dict[str, list[int]]]] = {}
    for group in groups:
        representative = next(name for name in group if isinstance(modules[name], _GROUPED))
        batches.setdefault(representative, []).append(group)
    for representative, batch in batches.items():
        module = modules[representative]
        idxs = [alive[representative].index(i) for group in batch for i in group[representative]]
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        pruning = graph.get_pruning_group(module, fn, idxs=idxs)
        for item in pruning:
            target = item.dep.target.module
            target_name = names.get(target) if isinstance(target, nn.Module) else None
            if graph.is_out_channel_pruning_fn(item.dep.handler) and target_name in alive:
                gone = {alive[target_name][i] for i in item.idxs}
                alive[target_name] = [i for i in alive[target_name] if i not in gone]
        pruning.prune()
    return len(groups)


# ----------------------------------------------------------------------------------------------
# The method.
# ----------------------------------------------------------------------------------------------


@register_method
class SSR(Method):
    """Filter pruning by a structured-sparsity regulariser (L2,1 or L2,0) solved with AULM (arXiv 1901.07827)."""

    name = "ssr"
    Config = SSRConfig
    kind = "pruning"
    changes_architecture = True
    applies_to = "output channels of Conv2d and Linear layers; not the classifier or channels coupled to other kinds of layer"

    def __init__(self, config: SSRConfig | None = None) -> None:
        super().__init__(config)
        self.layers: list[Layer] = []
        self.active: list[int] = []
        self.since_update = 0
        self.gaps: list[float] = []
        self.removal: dict[str, float] = {}

    def touches(self, model: nn.Module, ctx: MethodContext) -> Touches:
        """The layers whose output channels SSR groups (training decides which groups are removed)."""
        probe = type(self)(self.config)
        probe.prepare(model, ctx)  # refuses as a trial would; it only reads the model
        grouped = {p.rpartition(".")[0] for layer in probe.layers for p in layer.params}
        classifier = set(output_layers(model, ctx.example_input))
        return Touches.split(
            model,
            [name for name, m in model.named_modules() if name in grouped and isinstance(m, (nn.Conv2d, nn.Linear))],
            lambda name, m: (
                "the classifier: its outputs are the classes"
                if name in classifier
                else "its channels are coupled to the classifier or to a layer of another kind"
            ),
        )

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        shared = shared_layers(model, ctx.example_input)
        if shared:
            name, calls = next(iter(shared.items()))
            raise NotApplicable(
                f"ssr cannot prune {type(model).__name__}: '{name}' runs {calls} times per forward pass (shared weights or a "
                "recurrent step), which torch-pruning's groups remove channels from once per call; use kse, od or minmax_quant."
            )
        self.layers = find_layers(model, ctx.example_input)
        if not self.layers:
            raise NotApplicable(
                f"ssr found no output channels of {type(model).__name__} to prune outside the classifier; use minmax_quant."
            )
        ctx.log(f"[ssr] {sum(layer.groups for layer in self.layers)} groups in {len(self.layers)} layers")
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        c = self.config
        aulm_epochs = ctx.epochs if c.aulm_epochs is None else c.aulm_epochs
        finetune = Phase(
            name="finetune",
            epochs=ctx.epochs if c.finetune_epochs is None else c.finetune_epochs,
            lr=c.finetune_lr,
            after_finalize=True,
        )
        common = {"epochs": aulm_epochs, "lr": c.lr, "loss": self.penalty, "after_step": self.after_aulm_step, "on_end": self.end_aulm}
        if c.schedule == "global":
            return [Phase(name="aulm", on_start=lambda model: self.start_aulm(model, range(len(self.layers))), **common), finetune]
        phases = []
        for index, layer in enumerate(self.layers):
            phases.append(
                Phase(
                    name=f"aulm[{layer.name}]",
                    on_start=lambda model, index=index: self.start_aulm(model, [index]),
                    param_groups=lambda model, layer=layer: [{"params": [model.get_parameter(n) for n in layer.params]}],
                    **common,
                )
            )
            phases.append(Phase(name=f"finetune[{layer.name}]", epochs=c.layer_finetune_epochs, lr=c.lr, after_step=self.keep_masks))
        return [*phases, finetune]

    # --- AULM -----------------------------------------------------------------------------------

    def start_aulm(self, model: nn.Module, indices: Any) -> None:
        """An AULM phase's ``on_start``: F = W, Y = 0 and each layer's ``lam_l`` from its mean group norm."""
        self.active = list(indices)
        self.since_update = 0
        self.gaps = []
        with torch.no_grad():
            for layer in self._active():
                weights = [w.detach().clone() for w in layer.weights(model)]
                scale = float(group_norms(weights, layer.group_of_row, layer.groups).mean())
                # L2,0 thresholds the squared norm: lam s^2 keeps its cut relative to the layer's scale.
                layer.lam = self.config.lam * (scale if self.config.variant == "l21" else scale**2)
                layer.f = weights
                layer.y = [torch.zeros_like(w) for w in weights]

    def _active(self) -> list[Layer]:
        return [self.layers[i] for i in self.active]

    def penalty(self, step: Step) -> torch.Tensor | None:
        """The W-step's augmentation ``(rho/2) ||W - F + Y/rho||^2`` over the layers in AULM (None: no layer)."""
        rho = self.config.rho
        total = None
        for layer in self._active():
            for w, f, y in zip(layer.weights(step.model), layer.f, layer.y):
                term = (w - f + y / rho).pow(2).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * rho * total

    def after_aulm_step(self, step: Step) -> None:
        """After every W-step: every ``update_period`` iterations, the F-step then the Y-step."""
        self.since_update += 1
        if (step.iteration + 1) % self.config.update_period == 0:
            self.update_f_and_y(step.model)

    def update_f_and_y(self, model: nn.Module) -> None:
        """F = prox(W + Y/rho) group by group, then Y += rho (W - F); records ``||W - F|| / ||W||``."""
        rho = self.config.rho
        gap, norm = 0.0, 0.0
        with torch.no_grad():
            for layer in self._active():
                weights = [w.detach() for w in layer.weights(model)]
                targets = [w + y / rho for w, y in zip(weights, layer.y)]
                layer.f, layer.zero = group_prox(targets, layer.group_of_row, layer.groups, self.config.variant, layer.lam, rho)
                layer.y = [y + rho * (w - f) for w, f, y in zip(weights, layer.f, layer.y)]
                gap += sum(float((w - f).pow(2).sum()) for w, f in zip(weights, layer.f))
                norm += sum(float(w.pow(2).sum()) for w in weights)
        self.since_update = 0
        self.gaps.append(math.sqrt(gap / max(norm, 1e-30)))

    def end_aulm(self, model: nn.Module) -> None:
        """An AULM phase's ``on_end``: a last F-step unless the last iteration made one; mask F's zero groups in W."""
        if self.since_update > 0 or any(layer.zero is None for layer in self._active()):
            self.update_f_and_y(model)
        for layer in self._active():
            apply_mask(model, layer)
            layer.f = layer.y = None
        self.active = []

    def keep_masks(self, step: Step) -> None:
        """A layer fine-tune's ``after_step``: the masked groups stay exactly zero."""
        for layer in self.layers:
            apply_mask(step.model, layer)

    # --- finalize -------------------------------------------------------------------------------

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, *ctx.example_input.shape[1:], generator=generator).to(ctx.example_input.device)
        with eval_mode(model):
            for layer in self.layers:
                apply_mask(model, layer)
            with torch.no_grad():
                reference = model(probe)
            groups = sum(layer.groups for layer in self.layers)
            zero = sum(int(layer.zero.sum()) for layer in self.layers if layer.zero is not None)
            removed = remove_zero_groups(model, self.layers, ctx.example_input)
            with torch.no_grad():
                error = float((model(probe) - reference).abs().max())
        self.removal = {
            "groups": float(groups),
            "zero_groups": float(zero),
            "groups_removed": float(removed),
            "removal_error": error,
            "w_minus_f": self.gaps[-1] if self.gaps else 0.0,
        }
        self.layers, self.active = [], []
        ctx.log(f"[ssr] removed {removed} of {groups} groups ({zero} zero); max logit change {error:.2e}")
        if not error <= 1e-4 * max(1.0, float(reference.abs().max())):
            ctx.log(f"[ssr] warning: the pruned model's logits differ from the masked model's by {error:.3g}")
        return model

    def metrics(self) -> dict[str, float]:
        """``groups``, ``zero_groups`` (masked), ``groups_removed`` (zero groups less those kept so a
        module keeps a channel), ``removal_error`` (largest logit change from the masked to the pruned
        model, ~1e-7) and ``w_minus_f`` (``||W - F|| / ||W||`` at the last F-step)."""
        return dict(self.removal)

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.as_dict() for layer in self.layers],
            "active": list(self.active),
            "since_update": self.since_update,
            "gaps": list(self.gaps),
            "removal": dict(self.removal),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layers = [Layer(**layer) for layer in state["layers"]]
        self.active = list(state["active"])
        self.since_update = int(state["since_update"])
        self.gaps = list(state["gaps"])
        self.removal = dict(state["removal"])
