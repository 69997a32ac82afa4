"""PAMS: quantization with a learned clipping bound and structured knowledge transfer.

Li et al., "PAMS: Quantized Super-Resolution via Parameterized Max Scale" (ECCV 2020,
arXiv 2011.04212), written from the paper's description.

Deciding (:func:`pams_layers`): which layers are quantized and where the activation quantizers
sit, and (:func:`feature_module_name`) which features the transfer compares.

- EDSR (:class:`models.edsr.ResBlock`): each block becomes a :class:`QuantResBlock` with
  k-bit weights in both convs and three activation quantizers: the block input (used by the
  first conv and by the skip path), the ReLU output (the second conv's input) and the scaled
  residual before the addition. This follows the paper's figure: the official code leaves the
  first conv's input unquantized (its issue #14), so not all activations in its body are k-bit.
- Other residual blocks (RDN's :class:`~models.rdn.RDB`, the CIFAR
  :class:`~models.cifar_resnet.BasicBlock`, torchvision's ``BasicBlock`` and
  ``Bottleneck``): every convolution inside the block (the RDB's dense convs and its 1x1 local
  fusion, a shortcut projection) gets k-bit weights and an activation quantizer on its input.
- A model without residual blocks (``digits_cnn``, ``vgg16``): every convolution except the
  first layer and the output layer, each with an activation quantizer on its input.

Head, upsampler, tail, classifier and everything outside the blocks stay in floating point.

Doing:

- Weights: symmetric per-tensor k-bit quantization with scale ``max|W|``, straight-through
  rounding (:class:`methods._quant.MaxAbsWeightQuantizer`).
- Activations (:class:`PAMSActivationQuantizer`): one learned bound alpha per quantizer (a
  parameter, initialised to 10). During the first ``stats_epochs`` epochs (phase
  ``calibrate``) every training step overwrites alpha with the batch mean of the per-sample
  ``max|x|`` (the official code's EMA is a no-op at its settings) and, as in the official code,
  rounds the activations to the grid of step ``alpha / qmax`` without clipping them (so values
  above the batch mean of the maxima keep codes beyond qmax), straight-through; evaluation
  always quantizes with clipping, also during calibration.
  From then on (phase ``qat``) ``x_q = round(clamp(x, -alpha, alpha) * qmax / alpha) * alpha / qmax``
  with a straight-through estimator; alpha gets gradients through the clamp (PACT) and the
  rounding. Activations are signed even after a ReLU, as in the paper.
- Structured knowledge transfer (SKT): ``A(F) = normalise_L2(mean_c F^2)`` over the spatial
  positions; ``L_SKT = mean((A(F_student) - A(F_teacher))^2)`` where F is the output of
  ``body_out`` (after the body and the global skip, before the upsampler) in the SR models, of
  the last residual block in ResNets, of ``features`` otherwise; the teacher is the frozen
  full-precision baseline (``ctx.teacher``). The loss of both phases is the task loss (L1 for
  super-resolution) plus the pipeline's other terms (distillation) plus ``skt_weight * L_SKT``,
  PAMS's own term (``loss_scope = "own"``); both feature maps are captured by the training
  step in the forward passes that compute the outputs (:meth:`methods.Step.features`).
- The student starts from the full-precision weights it is given (the official code trains from
  random initialisation, which its issues #12 and #15 show to fall short of the paper).
- Optimiser: Adam; weights at ``lr``, the alphas at ``alpha_lr`` without weight decay. The shared
  training loop anneals both with a cosine schedule (the paper: StepLR 10 epochs, gamma 0.5).
  Adam moves alpha by about ``alpha_lr`` a step whatever its gradient's size, and alpha is in
  the units of the activations (tens to hundreds on 0-255 images): the paper's 1e-2 suits its
  30k steps, while a run of a few hundred steps needs about 0.1 to 1 for alpha to move at all.
- Finalize packs every quantized weight into k-bit codes plus one float scale
  (:meth:`methods._quant.QuantMixin.pack`: int8 at 8 bits, two codes a byte at 4 bits, a bit
  stream at 3); the packed model computes the same outputs, its exported program shrinks with
  the bit width and ``size_bytes`` counts the packed bytes plus the float tensors (alphas,
  scales, biases, the float layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from methods._base import Method, MethodContext, NotApplicable
from methods._hyperparameters import Range, hyperparameter
from methods._quant import MaxAbsWeightQuantizer, QuantConv2d, QuantMixin, qmax, quantized_layers, round_ste, symmetric_quantize
from methods._registry import register_method
from methods._surgery import first_layers, holds_method_layers, output_layers
from methods._training import Phase, Step

__all__ = [
    "PAMS",
    "PAMSConfig",
    "PAMSActivationQuantizer",
    "QuantResBlock",
    "pams_layers",
    "quantize_for_pams",
    "feature_module_name",
    "attention_map",
    "skt_loss",
    "activation_quantizers",
]

ALPHA_INIT = 10.0


class PAMSActivationQuantizer(nn.Module):
    """Symmetric k-bit activation quantizer with a learned clipping bound ``alpha``.

    Attributes:
        calibrating: While True, training steps set ``alpha`` to the batch mean of the
            per-sample ``max|x|`` and round the input to multiples of ``alpha / qmax`` without
            clipping it; evaluation quantizes (clipped) at the current ``alpha``. A Python flag,
            not a buffer: ``torch.export`` cannot branch on a tensor's value.
    """

    def __init__(self, bits: int, init: float = ALPHA_INIT, device: torch.device | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(init), device=device))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating and self.training:
            with torch.no_grad():
                self.alpha.copy_(x.detach().abs().flatten(1).amax(dim=1).mean())
            # As the official code: rounded to the grid of step alpha / qmax, not clipped (values
            # beyond alpha keep codes above qmax); alpha gets no gradient in this phase.
            step = self.alpha.detach().clamp_min(1e-8) / qmax(self.bits)
            return round_ste(x / step) * step
        return symmetric_quantize(x, self.alpha, self.bits, ste=self.training)

    def integer_grid(self) -> tuple[torch.Tensor, int]:
        """``(alpha, bits)``: the learned clipping bound and width it quantizes with in eval mode.

        Read by the ONNX form (:mod:`deploy._onnx`), whose ``QuantizeLinear`` uses this bound.
        """
        return self.alpha.detach(), self.bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={self.alpha.item():.4g}, calibrating={self.calibrating}"


class QuantResBlock(nn.Module):
    """An EDSR :class:`~models.edsr.ResBlock` with PAMS's quantizers (placement: module docstring).

    ``x_q = quant_in(x)``; ``out = quant_out(res_scale * conv2(quant(act(conv1(x_q))))) + x_q``,
    the middle quantizer being ``conv2``'s input quantizer.
    """

    def __init__(self, block: nn.Module, bits: int) -> None:
        super().__init__()
        device = block.conv1.weight.device
        self.quant_in = PAMSActivationQuantizer(bits, device=device)
        self.conv1 = QuantConv2d.from_float(block.conv1, MaxAbsWeightQuantizer(bits), None)
        self.conv1.quantized_input_bits = bits  # its input is quant_in's output
        self.act = block.act
        self.conv2 = QuantConv2d.from_float(block.conv2, MaxAbsWeightQuantizer(bits), PAMSActivationQuantizer(bits, device=device))
        self.quant_out = PAMSActivationQuantizer(bits, device=device)
        self.res_scale = block.res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_in(x)
        residual = self.conv2(self.act(self.conv1(x))) * self.res_scale
        return self.quant_out(residual) + x


# --- deciding -----------------------------------------------------------------------------------


def _edsr_block_type() -> type:
    from models.edsr import ResBlock

    return ResBlock


def _residual_block_types() -> tuple[type, ...]:
    """Blocks whose convolutions PAMS quantizes, each with a quantizer on its input."""
    from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock
    from torchvision.models.resnet import Bottleneck

    from models.cifar_resnet import BasicBlock
    from models.rdn import RDB

    return (RDB, BasicBlock, TorchvisionBasicBlock, Bottleneck)


def pams_layers(model: nn.Module, example_input: torch.Tensor) -> tuple[list[str], list[str]]:
    """Where PAMS quantizes ``model`` (rules: module docstring).

    Returns:
        ``(edsr_blocks, convs)``: names of the EDSR blocks to turn into :class:`QuantResBlock`
        and of the other convolutions to quantize (weights and input).
    """
    edsr_block, block_types = _edsr_block_type(), _residual_block_types()
    edsr_blocks = [name for name, m in model.named_modules() if isinstance(m, edsr_block)]
    convs: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, block_types) and not any(name.startswith(f"{b}.") for b in edsr_blocks):
            convs += [
                f"{name}.{inner}"
                for inner, m in module.named_modules()
                if isinstance(m, nn.Conv2d) and not isinstance(m, QuantMixin) and f"{name}.{inner}" not in convs
            ]
    if edsr_blocks or convs:
        return edsr_blocks, convs
    keep = set(first_layers(model, example_input)) | set(output_layers(model, example_input))
    return [], [
        name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(m, QuantMixin) and name not in keep
    ]


def feature_module_name(model: nn.Module) -> str:
    """The module whose output is the feature map F of the knowledge transfer.

    ``body_out`` where the model has one (EDSR, RDN), else the last residual block, else a
    child named ``features``, else the last convolution.
    """
    children = dict(model.named_children())
    if "body_out" in children:
        return "body_out"
    block_types = (_edsr_block_type(), *_residual_block_types())
    blocks = [name for name, m in model.named_modules() if isinstance(m, block_types)]
    if blocks:
        return blocks[-1]
    if "features" in children:
        return "features"
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise NotApplicable("pams quantizes Conv2d layers, but the model has none; use minmax_quant, which quantizes Linear layers too.")
    return convs[-1]


# --- doing --------------------------------------------------------------------------------------


def quantize_for_pams(model: nn.Module, bits: int, example_input: torch.Tensor) -> list[str]:
    """Insert PAMS's quantizers into ``model`` in place; returns the names of the quantized convolutions."""
    edsr_blocks, convs = pams_layers(model, example_input)
    for name in edsr_blocks:
        model.set_submodule(name, QuantResBlock(model.get_submodule(name), bits).train(model.training))
    for name in convs:
        conv = model.get_submodule(name)
        act = PAMSActivationQuantizer(bits, device=conv.weight.device)
        model.set_submodule(name, QuantConv2d.from_float(conv, MaxAbsWeightQuantizer(bits), act).train(model.training))
    return [f"{b}.conv{i}" for b in edsr_blocks for i in (1, 2)] + convs


def activation_quantizers(model: nn.Module) -> list[PAMSActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, PAMSActivationQuantizer)]


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """``normalise_L2(mean over channels of F^2)``, flattened to ``(batch, positions)``."""
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def skt_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the teacher's carries no gradient)."""
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()


# --- the method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PAMSConfig:
    bits: int = hyperparameter(
        4,
        "bit width of the weights and activations inside the residual blocks",
        Range(choices=(2, 3, 4, 8)),
        at_least=2,
        at_most=8,
        compresses="low",
    )
    skt_weight: float = hyperparameter(
        1e3,
        "weight of the structured knowledge transfer (attention-map MSE to the teacher); 0 turns it off",
        Range(1.0, 1e4, log=True),
        at_least=0.0,
    )
    alpha_lr: float = hyperparameter(
        1e-2,
        "learning rate of the activation clipping bounds alpha (1e-2 in the paper's 30k steps; short runs need more)",
        Range(1e-3, 1.0, log=True),
        at_least=0.0,
    )
    lr: float = hyperparameter(1e-4, "learning rate of the weights", Range(1e-5, 1e-3, log=True), above=0.0)
    epochs: int | None = hyperparameter(
        None,
        "epochs of quantization-aware training after calibration; unset (null): the space's budget.epochs",
        Range(1, 30),
        at_least=0,
        budget=True,
    )
    stats_epochs: int = hyperparameter(
        1, "first epochs in which alpha follows the activations' max statistic, unclipped (calibration)", at_least=0, budget=True
    )
    optimizer: Literal["adam", "sgd"] = hyperparameter("adam", "optimizer of both phases: adam (the paper) or sgd")


@register_method
class PAMS(Method):
    """Quantization of residual blocks with a learned clipping bound and structured knowledge transfer (arXiv 2011.04212)."""

    name = "pams"
    Config = PAMSConfig
    kind = "quantization"
    needs_teacher = True
    changes_architecture = True
    must_be_last = True
    loss_scope = "own"
    applies_to = "Conv2d layers (and EDSR blocks), weights and inputs; not the first layer or the classifier"

    def __init__(self, config: PAMSConfig | None = None) -> None:
        super().__init__(config)
        self._feature = ""
        self._layers: list[str] = []
        self._alpha_start: list[float] | None = None
        self._alpha_end: list[float] | None = None

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self._feature = feature_module_name(model)
        if self.config.skt_weight > 0:
            try:
                ctx.teacher.get_submodule(self._feature)
            except AttributeError:
                raise ValueError(
                    f"pams compares the features of '{self._feature}', which the teacher lacks; "
                    "set skt_weight: 0 or put pams before the method that renamed it."
                ) from None
        if pams_layers(model, ctx.example_input) == ([], []) and not holds_method_layers(model):
            raise NotApplicable(
                f"pams quantizes Conv2d layers other than the first and the classifier, but {type(model).__name__} has none; "
                "use minmax_quant, which quantizes Linear layers too."
            )
        self._layers = quantize_for_pams(model, self.config.bits, ctx.example_input)
        for quantizer in activation_quantizers(model):
            quantizer.calibrating = self.config.stats_epochs > 0
        ctx.log(
            f"[pams] {len(self._layers)} convolutions and {len(activation_quantizers(model))} activations "
            f"quantized to {self.config.bits} bits; knowledge transfer on '{self._feature}'"
        )
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        common: dict[str, Any] = {"lr": self.config.lr, "optimizer": self.config.optimizer}
        phases = []
        if self.config.stats_epochs > 0:
            phases.append(Phase("calibrate", self.config.stats_epochs, param_groups=self._weight_groups, **common))
        phases.append(
            Phase(
                "qat",
                ctx.epochs if self.config.epochs is None else self.config.epochs,
                on_start=self._end_calibration,
                param_groups=self._qat_groups,
                **common,
            )
        )
        return phases

    def _weight_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        alphas = {id(q.alpha) for q in activation_quantizers(model)}
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in alphas]}]

    def _qat_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The weights at ``lr``; the alphas at ``alpha_lr`` without weight decay."""
        alphas = [q.alpha for q in activation_quantizers(model)]
        return self._weight_groups(model) + [{"params": alphas, "lr": self.config.alpha_lr, "weight_decay": 0.0}]

    def _end_calibration(self, model: nn.Module) -> None:
        """When the ``qat`` phase starts (or at finalize without one): alpha stops following the statistics."""
        quantizers = activation_quantizers(model)
        for quantizer in quantizers:
            quantizer.calibrating = False
        if self._alpha_start is None:
            self._alpha_start = [q.alpha.item() for q in quantizers]

    def loss(self, step: Step) -> torch.Tensor | None:
        """``skt_weight`` times the knowledge transfer between the student's and the teacher's features (PAMS's phases only)."""
        if self.config.skt_weight == 0:
            return None
        return self.config.skt_weight * skt_loss(step.features(self._feature), step.teacher_features(self._feature))

    def feature_modules(self) -> tuple[str, ...]:
        return (self._feature,) if self.config.skt_weight > 0 else ()

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self._end_calibration(model)
        self._alpha_end = [q.alpha.item() for q in activation_quantizers(model)]
        for layer in quantized_layers(model):
            layer.pack()
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"feature": self._feature, "layers": list(self._layers), "alpha_start": self._alpha_start, "alpha_end": self._alpha_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._feature = state["feature"]
        self._layers = list(state["layers"])
        self._alpha_start, self._alpha_end = state["alpha_start"], state["alpha_end"]

    def metrics(self) -> dict[str, float]:
        out = {"bits": float(self.config.bits), "quantized_layers": float(len(self._layers))}
        if self._alpha_start and self._alpha_end:
            ratios = [end / start for start, end in zip(self._alpha_start, self._alpha_end) if start > 0]
            out["activation_quantizers"] = float(len(self._alpha_end))
            if ratios:
                # Below 1: the learned bounds clip harder than the calibrated max statistic.
                out["alpha_ratio"] = float(sum(ratios) / len(ratios))
        return out
