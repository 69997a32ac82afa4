"""Symmetric uniform k-bit quantization-aware training (min-max ranges) of weights and activations.

Every ``nn.Conv2d`` and ``nn.Linear`` (except the first and the last layer, which stay in floating
point unless ``quantize_first_last``) quantizes its weight per tensor with scale ``max|W|`` (at 2 bits
at most ``1.4 mean|W|``: :class:`methods._quant.MaxAbsWeightQuantizer`) and its
input with a bound tracked as a running average of the batch ``max|x|``. Rounding uses a
straight-through estimator. Finalize packs each weight into int8 codes and one scale (so the
exported file shrinks); ``size_bytes`` counts the weights at ``bits`` bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods._base import Method, MethodContext, Touches
from methods._hyperparameters import Range, hyperparameter
from methods._quant import MaxAbsWeightQuantizer, RunningMaxActivationQuantizer, quantized_layers, swap_to_quantized
from methods._registry import register_method
from methods._surgery import first_layers, output_layers

__all__ = ["MinMaxQuant", "MinMaxQuantConfig"]


@dataclass(frozen=True)
class MinMaxQuantConfig:
    bits: int = hyperparameter(
        8, "bit width of weights and activations", Range(choices=(2, 3, 4, 8)), at_least=2, at_most=8, compresses="low"
    )
    quantize_activations: bool = hyperparameter(True, "also quantize the input of every quantized layer")
    quantize_first_last: bool = hyperparameter(False, "also quantize the first and the last layer")


@register_method
class MinMaxQuant(Method):
    """Symmetric uniform k-bit quantization-aware training of weights and activations with min-max ranges."""

    name = "minmax_quant"
    Config = MinMaxQuantConfig
    kind = "quantization"
    changes_architecture = True
    must_be_last = True
    example_models = ("digits_cnn", "resnet20", "gru", "two_branch_digits")
    applies_to = "every Conv2d and Linear layer, weights and inputs; the first and the classifier only with quantize_first_last"

    def __init__(self, config: MinMaxQuantConfig | None = None) -> None:
        super().__init__(config)
        self.swapped: list[str] = []

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        skip = set()
        if not self.config.quantize_first_last:
            skip = set(first_layers(model, ctx.example_input)) | set(output_layers(model, ctx.example_input))
        bits = self.config.bits

        def make_quantizers(name, layer):
            act = RunningMaxActivationQuantizer(bits) if self.config.quantize_activations else None
            return MaxAbsWeightQuantizer(bits), act

        self.swapped = swap_to_quantized(model, make_quantizers, skip)
        ctx.log(f"[minmax_quant] {len(self.swapped)} layers quantized to {bits} bits")
        return model

    def touches(self, model: nn.Module, ctx: MethodContext) -> Touches:
        """The layers swapped for quantized ones; the first and the classifier stay in floating point unless ``quantize_first_last``."""
        ends = set(first_layers(model, ctx.example_input)) | set(output_layers(model, ctx.example_input))
        return Touches.split(
            model,
            super().touches(model, ctx).changed,
            lambda name, m: (
                "the first layer or the classifier: kept in floating point (set `quantize_first_last: true`)"
                if name in ends
                else f"a {type(m).__name__}, not an nn.Conv2d or nn.Linear it swaps"
            ),
        )

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for layer in quantized_layers(model):
            layer.pack()
        return model

    def metrics(self) -> dict[str, float]:
        return {"bits": float(self.config.bits), "quantized_layers": float(len(self.swapped))}

    def state_dict(self) -> dict[str, list[str]]:
        return {"swapped": list(self.swapped)}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self.swapped = list(state["swapped"])
