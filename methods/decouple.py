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
MACs and CPU latency either way. The gated convolution, the surgery and the measurements are in
:mod:`methods._gated_conv`; interpretation and adversarial detection (:func:`filter_paths`,
:func:`hamming_distances`, :func:`knn_accuracy`, :func:`fgsm_path_distances`, :func:`analyse`) and
the report (:func:`write_report`) in :mod:`methods._decouple_analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deploy import eval_mode
from methods._base import Method, MethodContext, NotApplicable
from methods._decouple_analysis import (
    Analysis,
    analyse,
    auroc,
    detection_auroc,
    fgsm,
    fgsm_path_distances,
    filter_paths,
    hamming_distances,
    knn_accuracy,
    write_report,
)
from methods._gated_conv import (
    ArchitectureControl,
    Encodings,
    GatedConv,
    collect_encodings,
    expected_macs,
    find_gate_sites,
    gated_convs,
    insert_gates,
    latencies,
    remove_inactive_filters,
    set_dynamic,
    static_macs,
)
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._training import Phase, Step, Update

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
    "detection_auroc",
    "Analysis",
    "analyse",
    "write_report",
]

#: Which form the trial's model is, from the least to the most compressing (in MACs).
Form = Literal["static", "dynamic"]


@dataclass(frozen=True)
class DecoupleConfig:
    lambda_s: float = hyperparameter(
        1e-3, "weight of the L1 norm of the encodings (open gates per sample)", Range(1e-4, 1e-2, log=True), at_least=0.0, compresses="high"
    )
    lambda_mi: float = hyperparameter(
        1.0, "weight of the auxiliary classifier's CE on the encodings (mutual-information bound)", Range(0.1, 1.0), at_least=0.0
    )
    acm_reduction: Literal[4, 8, 16] = hyperparameter(
        4, "ACM hidden width: max(4, C_out // acm_reduction)", Range(choices=(4, 8, 16)), compresses="high"
    )
    threshold: float = hyperparameter(
        0.5, "a gate is open where the ACM's sigmoid exceeds this", Range(0.3, 0.7), above=0.0, below=1.0, compresses="high"
    )
    prune_below: float = hyperparameter(
        0.0,
        "filters open on at most this fraction of validation inputs are removed at finalize",
        Range(0.0, 0.1),
        at_least=0.0,
        below=1.0,
        compresses="high",
    )
    form: Form = hyperparameter(
        "dynamic",
        "the trial's model: static (dense, pruned) or dynamic (skips closed filters per input)",
        Range(choices=("static", "dynamic")),
        compresses="high",
    )
    epochs: int | None = hyperparameter(
        None, "epochs of gated training; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True
    )
    lr: float = hyperparameter(1e-3, "learning rate of the network's weights (Adam)", Range(1e-4, 1e-2, log=True), above=0.0)
    acm_lr: float = hyperparameter(
        0.01, "learning rate of the ACMs and the auxiliary classifier (Adam)", Range(1e-3, 0.05, log=True), above=0.0
    )
    fgsm_epsilon: float = hyperparameter(0.25, "FGSM step (input units) of the adversarial-detection figures and report", above=0.0)


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
    applies_to = "Conv2d filters (groups=1) whose channels can be removed on their own: gated per input, the never-used ones removed"
    # Later methods would rebuild or quantize the gated convs, whose dynamic form reads their
    # weights directly: the gated architecture is final.
    must_be_last = True

    def __init__(self, config: DecoupleConfig | None = None) -> None:
        super().__init__(config)
        self.sites: list[tuple[str, str | None]] = []
        self.aux: nn.Linear | None = None
        self.figures: dict[str, float] = {}

    @classmethod
    def model_facts(cls, model: nn.Module, example_input: torch.Tensor) -> tuple[int, ...]:
        """The output width of each convolution that gets a gate (:func:`find_gate_sites`)."""
        return tuple(model.get_submodule(conv).out_channels for conv, _ in find_gate_sites(model, example_input))

    @classmethod
    def effective_config(cls, config: DecoupleConfig, facts: tuple[int, ...] | None) -> dict[str, Any]:
        """``acm_reduction`` becomes each gate's hidden width, ``max(4, C_out // acm_reduction)``: the only use of it."""
        values = super().effective_config(config, facts)
        if facts is not None:
            values["acm_reduction"] = tuple(max(4, width // config.acm_reduction) for width in facts)
        return values

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.sites = find_gate_sites(model, ctx.example_input)
        if not self.sites:
            raise NotApplicable(
                f"decouple found no Conv2d of {type(model).__name__} (groups=1) whose filters can be gated on their own "
                "(each is coupled to a residual addition, attention or a layer called twice, or there is none); use l1_filter or minmax_quant."
            )
        with eval_mode(model), torch.no_grad():
            classes = model(ctx.example_input).shape[1]
        with torch.random.fork_rng(devices=[]):  # the ACMs' initial weights, without moving the trial's random stream
            torch.manual_seed(ctx.seed)
            insert_gates(model, self.sites, self.config.acm_reduction, self.config.threshold)
        filters = sum(m.conv.out_channels for m in gated_convs(model).values())
        self.aux = nn.Linear(filters, classes).to(ctx.device)
        ctx.log(f"[decouple] gates on {filters} filters of {len(self.sites)} convolutions")
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        epochs = ctx.epochs if self.config.epochs is None else self.config.epochs
        updates = (
            (Update("auxiliary", self._aux_groups, self.aux_loss, lr=self.config.acm_lr, optimizer="adam", weight_decay=0.0),)
            if self.aux is not None
            else ()
        )
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
