"""GAL: label-free structured pruning by generative adversarial learning (Lin et al., CVPR 2019).

"Towards Optimal Structured CNN Pruning via Generative Adversarial Learning", arXiv 1903.09291;
written from the paper's description, not from the official code (which has no license).

The baseline is the frozen teacher. The student is the same network with **soft masks**: learnable
scales that multiply the output of a prunable structure. Which structures get masks depends on the
architecture (``structure``):

* ``"block"``: one scalar per residual block (our CIFAR ``BasicBlock``, torchvision's
  ``BasicBlock`` and ``Bottleneck``), multiplying the residual branch before the addition. The
  mask wraps the batch norm that ends the branch.
* ``"channel"``: one scalar per output channel of every convolution whose channels can be removed
  on their own (VGG, plain CNNs, and the inner convolutions of residual branches), after its batch
  norm (or after the convolution when no batch norm follows). "On their own" is decided with
  torch-pruning's dependency graph: the convolution's channel group may hold no other layer's
  output channels (a residual addition or a depthwise convolution would couple them). The
  classifier never gets masks.
* ``"joint"``: both at once (the paper's ResNet-50 "joint" variant).
* ``"auto"``: ``"block"`` when the model has residual blocks, ``"channel"`` otherwise.

Training objective of the adversarial phase (labels are never read)::

    min_{W_G, m} max_{W_D}  L_adv + mu * MSE(f_b(x), f_g(x)) + R(W_G) + lam * ||m||_1 + R(W_D)

Each iteration (i) updates the discriminator D, an MLP C->128->256->128->1 on logits (baseline =
real, student = fake); (ii) updates the student's weights by SGD on the generator loss (fool D,
plus mu * MSE; weight decay from the optimizer); (iii) every ``mask_step`` iterations updates the
masks by FISTA with that iteration's gradient: a proximal step with soft-threshold ``mask_lr * lam``
and Nesterov momentum, the masks kept ``>= 0``. The proximal step gives exact zeros. The masks are
not in the optimizer of the student's weights. Step (i) is an :class:`~methods.Update` that the
training loop takes before the student's step; it builds D's optimizer and checkpoints it with
the phase, and D's weights are part of :meth:`GAL.state_dict`. A pipeline method with a
``"pipeline"`` loss term (kd) adds it to the generator loss of step (ii).

Finalize: a residual block whose mask is zero becomes its shortcut (``relu(shortcut(x))``, exactly
what the block computes when its branch is scaled by zero); zero-mask channels are removed with
torch-pruning together with every channel that depends on them (the next layer's inputs); the
remaining mask values are folded into the batch norm (or convolution) they scale. The result holds
no mask module and computes the same function as the masked student in eval mode. An optional
cross-entropy fine-tune (``finetune_epochs``, labelled) follows.

Choices where the paper and its code are ambiguous or buggy:

* Discriminator: D returns one raw logit and the losses use ``BCEWithLogits``, so the sigmoid is
  applied once (the official code applies it twice, which confines D to probabilities in about
  (0.5, 0.73)). Its four linear layers have no nonlinearity between them, as described.
* R(W_D): as in the official code, an extra BCE term pushes D(student) towards "real" during D's
  update, so D cannot drive the student's score below one half.
* Mask initialisation: ``mask_init="ones"`` (default) starts every mask at 1, so the student starts
  as exactly the baseline and a structure is removed only because the objective drives its mask to
  zero. The official code draws N(0, 1), which starts about half of the masks negative so that
  they are clamped to zero at the first FISTA step: pruning then owes as much to the random draw
  as to the objective. ``mask_init="normal"`` reproduces that on purpose (for the paper's rows; it
  is also the first search choice, so a pre-flight that searches it removes structures after one
  step). Masks are projected onto ``>= 0`` before removal, which matters only for N(0, 1) masks
  that no FISTA step has reached; a structure is removed when its mask is exactly 0.
* Lambda scaling: each FISTA step soft-thresholds by ``mask_lr * lam``, and the L1 term enters
  only there (lam is not normalised by the number of masks or of steps). The official code puts
  ``lambda * |m|_1`` into the loss, so the masks' gradient already holds ``lambda`` (a positive
  mask), and then soft-thresholds by ``lr * lambda`` again: a mask shrinks by
  ``2 * lr * lambda`` per step beyond the loss gradient. Our ``lam`` is therefore twice the
  official ``--lambda``, the number in the paper's model names: :func:`lam_from_official` maps
  one to the other, and the paper's GAL-0.6 (GAL-0.8) on CIFAR ResNet-56 is ``lam=1.2`` (1.6),
  ``mu=1, mask_lr=0.01, mask_step=200`` (``bench/gal_vs_l1.py --paper-lambda 0.6``). At a fixed
  point a mask is non-zero only where the loss gradient pulling it up exceeds ``lam``.
  ``mask_step`` defaults to 1 here (a FISTA step every iteration) because our trials are far
  shorter than the paper's 100 epochs; with 200 a short run makes almost no FISTA steps.
* FISTA: the textbook form (Beck & Teboulle): the network uses the extrapolated point, which is
  clamped to ``>= 0`` as in the official code. Unlike that code, whose restart flag is never true
  when the step runs, the momentum restarts whenever the proximal step goes against it (the
  gradient restart of O'Donoghue & Candes): the weights keep changing between mask steps, and
  unchecked momentum overshoots.
* Batch-norm statistics are frozen (eval mode) in the adversarial phase, as the baseline's. In
  train mode the next batch norm renormalises a layer's output, so scaling all of a layer's
  channel masks together changes nothing: L1 then shrinks them all at no cost until the running
  statistics no longer fit and the eval-mode network collapses (seen on digits: 11% accuracy).
  Frozen statistics also make the trained student the very function that finalize preserves.
  Without batch normalisation's damping the student needs a smaller step: ``lr`` defaults to
  1e-3 (the paper's 0.01 diverged on digits within ten iterations).
* Optimizers: SGD with momentum 0.9 for the student (cosine schedule, as every phase here), D and
  the fine-tune; D and the masks keep a constant learning rate.
* ``needs_labels`` is False: the pruning is label-free; only the optional fine-tune reads labels
  (``finetune_epochs=0``, the default, keeps the whole method label-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from deploy import eval_mode
from methods._base import Method, MethodContext, NotApplicable, Touches
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import dependency_graph, output_layers
from methods._training import Phase, Step, Update

__all__ = [
    "GAL",
    "GALConfig",
    "SoftMask",
    "RemovedBlock",
    "Discriminator",
    "MaskSites",
    "find_mask_sites",
    "insert_masks",
    "fista_step",
    "lam_from_official",
    "remove_masked_structures",
]

# "auto" is block for a residual model and channel otherwise; the other choices are listed from
# the least to the most compressing (joint masks both), which `compresses="high"` reads.
Structure = Literal["auto", "channel", "block", "joint"]
#: Initial masks: ones (the student starts as the baseline) or N(0, 1), from which FISTA zeroes more.
MaskInit = Literal["ones", "normal"]


@dataclass(frozen=True)
class GALConfig:
    lam: float = hyperparameter(
        0.1,
        "lambda: weight of the L1 norm of the masks (FISTA threshold mask_lr * lam); twice the official code's lambda (GAL-0.6 is lam 1.2)",
        Range(1e-3, 10.0, log=True),
        at_least=0.0,
        compresses="high",
    )
    mu: float = hyperparameter(1.0, "weight of the MSE between baseline and student logits", Range(0.1, 1.0, log=True), at_least=0.0)
    mask_step: int = hyperparameter(1, "iterations between FISTA steps of the masks", Range(1, 200, log=True), at_least=1, compresses="low")
    lr: float = hyperparameter(1e-3, "learning rate of the student's weights (SGD)", Range(1e-4, 1e-2, log=True), above=0.0)
    mask_lr: float = hyperparameter(0.01, "FISTA step size of the masks", Range(1e-3, 0.05, log=True), above=0.0, compresses="high")
    disc_lr: float = hyperparameter(0.01, "learning rate of the discriminator (SGD)", Range(1e-3, 0.1, log=True), above=0.0)
    adversarial_epochs: int | None = hyperparameter(
        None, "epochs of the adversarial phase; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True
    )
    finetune_epochs: int = hyperparameter(
        0, "epochs of the labelled cross-entropy fine-tune after removal; 0 skips it", Range(0, 30), at_least=0, budget=True
    )
    finetune_lr: float = hyperparameter(0.01, "learning rate of the fine-tune (SGD)", Range(1e-4, 0.1, log=True), above=0.0)
    structure: Structure = hyperparameter(
        "auto",
        "what a mask scales: block, channel, joint (both) or auto (block for residual models)",
        Range(choices=("channel", "block", "joint")),
        compresses="high",
    )
    mask_init: MaskInit = hyperparameter(
        "ones",
        "initial masks: ones (student = baseline) or normal (the official code's N(0, 1))",
        Range(choices=("ones", "normal")),
        compresses="high",
    )


# ----------------------------------------------------------------------------------------------
# Modules: the soft mask, a removed block, the discriminator.
# ----------------------------------------------------------------------------------------------


class SoftMask(nn.Module):
    """``inner(x)`` times a learnable mask: one scalar (a block) or one value per channel.

    Also holds the mask's FISTA state, so a checkpointed model carries it.

    Args:
        inner: The module whose output is scaled (a batch norm or a convolution).
        kind: ``"block"`` or ``"channel"``.
        init: Initial mask values: one for a block, one per output channel of ``inner``.
    """

    def __init__(self, inner: nn.Module, kind: str, init: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind
        self.mask = nn.Parameter(init.clone())
        # FISTA state: the last proximal iterate x_k and the momentum sequence t_k.
        self.register_buffer("fista_x", init.clone())
        self.register_buffer("fista_t", torch.ones((), device=init.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out * self.mask.view(shape)


class RemovedBlock(nn.Module):
    """What a residual block computes once its branch is scaled by zero: ``relu(shortcut(x))``."""

    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x))


class Discriminator(nn.Module):
    """MLP on logits, ``C -> 128 -> 256 -> 128 -> 1``; returns one raw logit per example (no sigmoid)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(num_classes, 128), nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.layers(logits).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Deciding: where masks go, how FISTA moves them.
# ----------------------------------------------------------------------------------------------


def _branch_end(module: nn.Module) -> str | None:
    """Name of the batch norm that ends the residual branch of a known block, else None.

    Known blocks compute ``relu(branch(x) + shortcut(x))`` with a branch that ends in a batch norm:
    torchvision's ``BasicBlock`` (``bn2``) and ``Bottleneck`` (``bn3``), and any block that exposes
    ``residual(x)`` and ``shortcut`` with its branch ending in ``bn2`` (slimtune's CIFAR
    ``BasicBlock``, whose docstring makes that promise).
    """
    from torchvision.models import resnet

    if isinstance(module, resnet.Bottleneck):
        return "bn3"
    if isinstance(module, resnet.BasicBlock):
        return "bn2"
    if callable(getattr(module, "residual", None)) and isinstance(getattr(module, "shortcut", None), nn.Module):
        if isinstance(getattr(module, "bn2", None), nn.BatchNorm2d):
            return "bn2"
    return None


def _shortcut(block: nn.Module) -> nn.Module:
    """The shortcut of a block that :func:`_branch_end` knows."""
    if hasattr(block, "downsample"):  # torchvision: None means the identity
        return block.downsample if block.downsample is not None else nn.Identity()
    return block.shortcut


@dataclass(frozen=True)
class MaskSites:
    """Where the soft masks go, by module name.

    Attributes:
        blocks: ``(block, branch end)``: a residual block and the batch norm ending its branch.
        channels: ``(conv, scaled)``: a convolution whose output channels can be removed on their
            own, and the module whose output the mask scales (its batch norm, or the conv itself).
    """

    blocks: tuple[tuple[str, str], ...]
    channels: tuple[tuple[str, str], ...]


def resolve_structure(structure: str, model: nn.Module) -> str:
    """``"auto"`` becomes ``"block"`` for a model with residual blocks and ``"channel"`` otherwise."""
    if structure != "auto":
        return structure
    return "block" if any(_branch_end(m) is not None for m in model.modules()) else "channel"


def find_mask_sites(model: nn.Module, example_input: torch.Tensor, structure: str) -> MaskSites:
    """Choose where masks go for ``structure`` (``"auto"``, ``"block"``, ``"channel"`` or ``"joint"``).

    Raises:
        NotApplicable: The model has no structure of the requested kind.
    """
    structure = resolve_structure(structure, model)
    blocks: list[tuple[str, str]] = []
    if structure in ("block", "joint"):
        for name, module in model.named_modules():
            end = _branch_end(module)
            if end is not None:
                blocks.append((name, f"{name}.{end}"))
        if not blocks and structure == "block":
            raise NotApplicable(
                f"gal structure 'block' needs residual blocks, but {type(model).__name__} has none "
                "(known: slimtune's BasicBlock, torchvision's BasicBlock and Bottleneck); use 'channel' or 'auto'."
            )
    channels: list[tuple[str, str]] = []
    if structure in ("channel", "joint"):
        channels = _independent_channel_units(model, example_input)
        if not channels and not blocks:
            raise NotApplicable(
                f"gal found no Conv2d of {type(model).__name__} whose output channels can be removed on their own "
                "(none, or each is coupled to a residual addition, a depthwise convolution, attention or a layer called "
                "twice); use structure 'block' for a residual model, or l1_filter or minmax_quant."
            )
    return MaskSites(tuple(blocks), tuple(channels))


def _independent_channel_units(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv, scaled module)`` for every conv whose channel group touches no other layer's outputs."""
    names = {module: name for name, module in model.named_modules()}
    classifier = set(output_layers(model, example_input))
    graph = dependency_graph(model, example_input)
    units = []
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or name in classifier or conv not in graph.module2node:
            continue
        node = graph.module2node[conv]
        following = [n.module for n in node.outputs]
        bn = following[0] if len(following) == 1 and isinstance(following[0], nn.BatchNorm2d) and following[0].affine else None
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        # Any other module with weights whose outputs are in the group couples these channels to it, and so
        # does a parameter outside the layers (a table added to them): a masked channel would still carry it.
        coupled = {
            dep.target.module
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
            and (
                isinstance(dep.target.module, nn.Parameter)
                or (isinstance(dep.target.module, nn.Module) and any(True for _ in dep.target.module.parameters(recurse=False)))
            )
        }
        if coupled <= {conv, bn}:
            units.append((name, names[bn] if bn is not None else name))
    return units


def lam_from_official(official_lambda: float) -> float:
    """The ``lam`` that shrinks the masks as the official code's ``--lambda`` does: twice it.

    The official code's masks shrink by ``2 * lr * lambda`` per FISTA step (the L1 term in their
    gradient and again in the soft-threshold; module docstring), ours by ``lr * lam``. The
    paper's model names (GAL-0.6, GAL-0.8) give the official ``lambda``.
    """
    if official_lambda < 0:
        raise ValueError(f"`lambda >= 0` must hold, but got lambda={official_lambda}.")
    return 2.0 * official_lambda


def fista_step(
    mask: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, t: float, lr: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One FISTA step on non-negative masks with an L1 penalty (Beck & Teboulle, 2009).

    Args:
        mask: The point where ``grad`` was taken (the extrapolated point y_k).
        x_prev: The last proximal iterate x_{k-1}.
        grad: Gradient of the smooth loss at ``mask``.
        t: Momentum sequence t_k (1 at the start).
        lr: Step size.
        lam: L1 weight; the proximal step soft-thresholds by ``lr * lam``.

    Returns:
        ``(new mask y_{k+1}, new iterate x_k, t_{k+1})``. The iterate is the proximal point of
        ``lam * |m| + [m >= 0]``, ``max(0, v - lr * lam)``, so it has exact zeros; the new mask
        extrapolates with momentum ``(t_k - 1) / t_{k+1}`` and is clamped to ``>= 0``. When the
        proximal step goes against the momentum (``<y_k - x_k, x_k - x_{k-1}> > 0``) the momentum
        restarts (O'Donoghue & Candes, 2015): ``x_k`` is returned with ``t = 1``.
    """
    x = (mask - lr * grad - lr * lam).clamp_min(0.0)
    if float(((mask - x) * (x - x_prev)).sum()) > 0:
        return x, x, 1.0
    t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    y = (x + ((t - 1.0) / t_next) * (x - x_prev)).clamp_min(0.0)
    return y, x, t_next


# ----------------------------------------------------------------------------------------------
# Doing: insert masks, remove what they zeroed.
# ----------------------------------------------------------------------------------------------


def insert_masks(model: nn.Module, sites: MaskSites, init: str = "ones", generator: torch.Generator | None = None) -> list[SoftMask]:
    """Wrap every site of ``sites`` in a :class:`SoftMask`; returns the masks in site order."""
    masks = []
    requests = [(end, "block", 1) for _, end in sites.blocks]
    for _, scaled in sites.channels:
        module = model.get_submodule(scaled)
        size = module.num_features if isinstance(module, nn.BatchNorm2d) else module.out_channels
        requests.append((scaled, "channel", size))
    for name, kind, size in requests:
        inner = model.get_submodule(name)
        device = next(inner.parameters()).device
        if init == "ones":
            values = torch.ones(size)
        else:
            values = torch.randn(size, generator=generator)
        mask = SoftMask(inner, kind, values.to(device))
        model.set_submodule(name, mask)
        masks.append(mask)
    return masks


def soft_masks(model: nn.Module) -> list[SoftMask]:
    return [m for m in model.modules() if isinstance(m, SoftMask)]


def _fold_scale(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply ``module``'s output channels by ``scale`` through its weights."""
    with torch.no_grad():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.mul_(scale)
            module.bias.mul_(scale)
        else:
            module.weight.mul_(scale.view(-1, *([1] * (module.weight.dim() - 1))))
            if module.bias is not None:
                module.bias.mul_(scale)


@dataclass(frozen=True)
class Removal:
    """What :func:`remove_masked_structures` did."""

    masks: int
    zero_masks: int
    blocks: int
    blocks_removed: int
    channels: int
    channels_removed: int


def remove_masked_structures(model: nn.Module, sites: MaskSites, example_input: torch.Tensor) -> Removal:
    """Physically remove zero-mask structures and fold the other masks; ``model`` changes in place.

    A zero-mask block becomes a :class:`RemovedBlock`; the remaining masks are folded into the
    module they wrap; zero-mask channels are then pruned with torch-pruning (at least one channel
    of a layer stays, its weights zero, so the function is unchanged). No :class:`SoftMask` remains.
    """
    masks = soft_masks(model)
    zero_masks = sum(int((m.mask.detach() == 0).sum()) for m in masks)
    total = sum(m.mask.numel() for m in masks)
    blocks_removed = 0
    for block_name, end in sites.blocks:
        wrapper = model.get_submodule(end)
        if float(wrapper.mask.detach()) == 0.0:
            model.set_submodule(block_name, RemovedBlock(_shortcut(model.get_submodule(block_name))))
            blocks_removed += 1
    # Channels to prune, read before folding; units inside removed blocks are gone with them.
    to_prune: list[tuple[nn.Conv2d, list[int]]] = []
    channels = 0
    for conv_name, scaled in sites.channels:
        try:
            wrapper = model.get_submodule(scaled)
        except AttributeError:
            continue
        conv = wrapper.inner if conv_name == scaled else model.get_submodule(conv_name)
        zero = (wrapper.mask.detach() == 0).nonzero().flatten().tolist()
        channels += wrapper.mask.numel()
        if len(zero) == wrapper.mask.numel():
            zero = zero[1:]  # a layer keeps one (all-zero) channel so its shapes stay valid
        if zero:
            to_prune.append((conv, zero))
    for module_name, module in list(model.named_modules()):
        if isinstance(module, SoftMask):
            _fold_scale(module.inner, module.mask.detach())
            model.set_submodule(module_name, module.inner)
    if to_prune:
        graph = dependency_graph(model, example_input)
        for conv, zero in to_prune:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=zero).prune()
    return Removal(
        masks=total,
        zero_masks=zero_masks,
        blocks=len(sites.blocks),
        blocks_removed=blocks_removed,
        channels=channels,
        channels_removed=sum(len(z) for _, z in to_prune),
    )


# ----------------------------------------------------------------------------------------------
# The method.
# ----------------------------------------------------------------------------------------------


def _freeze_batchnorm_statistics(model: nn.Module, epoch: int) -> None:
    """The adversarial phase's ``on_epoch_start``: batch norms in eval mode (module docstring)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


@register_method
class GAL(Method):
    """Label-free pruning of blocks and channels by soft masks trained against a discriminator (arXiv 1903.09291)."""

    name = "gal"
    Config = GALConfig
    kind = "pruning"
    needs_teacher = True
    needs_labels = False
    changes_architecture = True
    applies_to = "residual blocks and Conv2d output channels that can be removed on their own; not the classifier"
    # The discriminator reads a vector of class logits per example, (batch, classes).
    task_kinds = ("classification",)

    def __init__(self, config: GALConfig | None = None) -> None:
        super().__init__(config)
        self.sites = MaskSites((), ())
        self.discriminator: Discriminator | None = None
        self.removal: dict[str, float] = {}

    def touches(self, model: nn.Module, ctx: MethodContext) -> Touches:
        """The convolutions whose channels get masks and the residual blocks that do (training decides what goes)."""
        sites = find_mask_sites(model, ctx.example_input, self.config.structure)
        classifier = set(output_layers(model, ctx.example_input))
        coupled = "its output channels are coupled to other layers' (a residual addition, a depthwise convolution, attention or a layer called twice)"
        return Touches.split(
            model,
            [block for block, _ in sites.blocks] + [conv for conv, _ in sites.channels],
            lambda name, m: (
                "the classifier: its outputs are the classes"
                if name in classifier
                else coupled
                if isinstance(m, nn.Conv2d)
                else "gal prunes Conv2d channels and residual blocks only"
            ),
        )

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        structure = resolve_structure(self.config.structure, model)
        self.sites = find_mask_sites(model, ctx.example_input, structure)
        generator = torch.Generator().manual_seed(ctx.seed)
        masks = insert_masks(model, self.sites, self.config.mask_init, generator)
        with torch.no_grad():
            num_classes = ctx.teacher.eval()(ctx.example_input).shape[1]
        self.discriminator = Discriminator(num_classes).to(ctx.device)
        ctx.log(
            f"[gal] {structure} masks: {len(self.sites.blocks)} blocks, "
            f"{sum(m.mask.numel() for m in masks if m.kind == 'channel')} channels in {len(self.sites.channels)} layers"
        )
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        phases = [
            Phase(
                name="adversarial",
                epochs=ctx.epochs if self.config.adversarial_epochs is None else self.config.adversarial_epochs,
                lr=self.config.lr,
                loss=self.adversarial_loss,
                task_loss=False,
                param_groups=self.student_weights,
                updates=(
                    Update("discriminator", self._discriminator_groups, self.discriminator_loss, lr=self.config.disc_lr, optimizer="sgd"),
                ),
                on_epoch_start=_freeze_batchnorm_statistics,
                after_step=self.mask_step,
                optimizer="sgd",
            )
        ]
        if self.config.finetune_epochs > 0:
            phases.append(
                Phase(name="finetune", epochs=self.config.finetune_epochs, lr=self.config.finetune_lr, after_finalize=True, optimizer="sgd")
            )
        return phases

    @staticmethod
    def student_weights(model: nn.Module) -> list[dict[str, Any]]:
        """The student's trainable weights without the masks (FISTA updates those)."""
        masks = {id(m.mask) for m in soft_masks(model)}
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in masks]}]

    def _discriminator_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.discriminator.parameters())}]

    def discriminator_loss(self, step: Step) -> torch.Tensor:
        """D's loss, before the student's step: baseline logits are real, the (detached) student's fake.

        The last term is R(W_D): it pulls D(student) towards "real" so D cannot win outright.
        """
        d = self.discriminator
        real, fake = d(step.teacher_outputs), d(step.outputs.detach())
        return _bce(real, True) + _bce(fake, False) + _bce(fake, True)

    def adversarial_loss(self, step: Step) -> torch.Tensor:
        """The student's loss, after D's update: fool D plus ``mu`` times the logit MSE.

        Label-free: reads the inputs, the teacher's and the student's logits, never the targets.
        """
        student, teacher = step.outputs, step.teacher_outputs
        return _bce(self.discriminator(student), True) + self.config.mu * F.mse_loss(student, teacher)

    def mask_step(self, step: Step) -> None:
        """After every optimizer step: every ``mask_step`` iterations a FISTA step with this step's gradient.

        The masks are in no optimizer, so their gradient is cleared here after every step.
        """
        masks = soft_masks(step.model)
        if (step.iteration + 1) % self.config.mask_step == 0:
            with torch.no_grad():
                for m in masks:
                    grad = m.mask.grad if m.mask.grad is not None else torch.zeros_like(m.mask)
                    y, x, t = fista_step(m.mask, m.fista_x, grad, float(m.fista_t), self.config.mask_lr, self.config.lam)
                    m.mask.copy_(y)
                    m.fista_x.copy_(x)
                    m.fista_t.fill_(t)
        for m in masks:
            m.mask.grad = None

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, *ctx.example_input.shape[1:], generator=generator).to(ctx.example_input.device)
        with eval_mode(model):
            with torch.no_grad():
                # FISTA keeps masks >= 0; only N(0, 1) masks that no FISTA step has reached yet are not.
                for m in soft_masks(model):
                    m.mask.clamp_(min=0.0)
                reference = model(probe)
            removal = remove_masked_structures(model, self.sites, ctx.example_input)
            with torch.no_grad():
                error = float((model(probe) - reference).abs().max())
        self.removal = {
            "zero_mask_fraction": removal.zero_masks / max(removal.masks, 1),
            "blocks": float(removal.blocks),
            "blocks_removed": float(removal.blocks_removed),
            "channels": float(removal.channels),
            "channels_removed": float(removal.channels_removed),
            "removal_error": error,
        }
        ctx.log(
            f"[gal] removed {removal.blocks_removed}/{removal.blocks} blocks and {removal.channels_removed}/"
            f"{removal.channels} channels; max logit change {error:.2e}"
        )
        if not error <= 1e-4 * max(1.0, float(reference.abs().max())):
            # Removal is exact when what follows a masked unit maps 0 to 0 (ReLU, pooling, a conv).
            ctx.log(f"[gal] warning: the pruned model's logits differ from the masked model's by {error:.3g}")
        return model

    def metrics(self) -> dict[str, float]:
        """``zero_mask_fraction``; ``blocks``/``blocks_removed``; ``channels`` (in the masked layers
        that survived block removal) and ``channels_removed``; ``removal_error`` (the largest logit
        change from the masked to the pruned model on a random batch, ~1e-7)."""
        return dict(self.removal)

    def state_dict(self) -> dict[str, Any]:
        discriminator = None
        if self.discriminator is not None:
            discriminator = {"num_classes": self.discriminator.layers[0].in_features, "weights": self.discriminator.state_dict()}
        return {
            "sites": {"blocks": [list(b) for b in self.sites.blocks], "channels": [list(c) for c in self.sites.channels]},
            "discriminator": discriminator,
            "removal": dict(self.removal),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sites = state["sites"]
        self.sites = MaskSites(tuple(map(tuple, sites["blocks"])), tuple(map(tuple, sites["channels"])))
        self.discriminator = None
        if state["discriminator"] is not None:
            weights = state["discriminator"]["weights"]
            self.discriminator = Discriminator(state["discriminator"]["num_classes"]).to(next(iter(weights.values())).device)
            self.discriminator.load_state_dict(weights)
        self.removal = dict(state["removal"])
