"""Min-max quantization: levels, straight-through gradient, packing, storage size, float first/last layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy import count_flops, count_params, latency_ms, size_bytes
from methods import create_method
from methods._quant import (
    MaxAbsWeightQuantizer,
    QuantConv2d,
    QuantLinear,
    RunningMaxActivationQuantizer,
    symmetric_quantize,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_k_bit_quantize_uses_at_most_2_to_the_k_minus_1_levels(bits: int) -> None:
    x = torch.linspace(-3.0, 3.0, 10_001)
    bound = torch.tensor(2.0)
    q = symmetric_quantize(x, bound, bits)
    levels = torch.unique(q)
    # Dense inputs past both ends of the bound reach every level, and no more than 2^k - 1.
    assert len(levels) == 2**bits - 1
    assert levels.min().item() == pytest.approx(-2.0) and levels.max().item() == pytest.approx(2.0)
    step = 2.0 / (2 ** (bits - 1) - 1)
    torch.testing.assert_close(levels[1:] - levels[:-1], torch.full((len(levels) - 1,), step), atol=1e-6, rtol=0)
    random = symmetric_quantize(torch.randn(1000, generator=torch.Generator().manual_seed(bits)), bound, bits)
    assert len(torch.unique(random)) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_straight_through_gradient_is_one_inside_the_bound_and_zero_outside(bits: int) -> None:
    x = torch.tensor([-1.9, -0.7, -0.01, 0.0, 0.3, 1.2, 1.99, -2.5, 2.5, 10.0], requires_grad=True)
    symmetric_quantize(x, torch.tensor(2.0), bits).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0] * 7 + [0.0] * 3))


def _observed(layer, x: torch.Tensor):
    layer.train()
    layer(x)  # the activation quantizer records its bound
    return layer.eval()


LAYERS = {
    "linear": (lambda: nn.Linear(16, 4), (8, 16)),
    "conv": (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6)),
}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bits", [3, 8])
def test_packed_layer_outputs_equal_fake_quantized_outputs(kind: str, bits: int) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    float_layer = make()
    cls = QuantLinear if kind == "linear" else QuantConv2d
    layer = cls.from_float(float_layer, MaxAbsWeightQuantizer(bits), RunningMaxActivationQuantizer(bits))
    x = torch.randn(*shape)
    layer = _observed(layer, x)
    with torch.no_grad():
        fake = layer(x)
        fake_weight = layer.quantized_weight().clone()
    layer.pack()
    assert "weight" not in dict(layer.named_parameters())
    assert layer.weight_codes.dtype == torch.int8
    qmax = 2 ** (bits - 1) - 1
    assert layer.weight_codes.abs().max().item() == qmax  # max|W| maps to the top code
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fake, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.quantized_weight(), fake_weight, atol=1e-6, rtol=0)
    # The fake-quantized weight differs from the float one: quantization did something.
    assert (fake_weight - float_layer.weight).abs().max().item() > 1e-4


def test_size_bytes_counts_the_packed_weight_at_its_bit_width() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(5, 3), MaxAbsWeightQuantizer(3), RunningMaxActivationQuantizer(3))
    _observed(layer, torch.randn(4, 5))
    float_bytes = 15 * 4 + 3 * 4
    assert size_bytes(nn.Linear(5, 3)) == float_bytes
    params_before = count_params(layer)
    layer.pack()
    # 15 weights at 3 bits = 45 bits -> 6 bytes; bias 3 float32 = 12; one float32 scale = 4;
    # the activation quantizer's float32 running bound = 4.
    assert size_bytes(layer) == 6 + 12 + 4 + 4
    assert count_params(layer) == params_before == 15 + 3


def test_size_bytes_of_an_8_bit_linear() -> None:
    layer = QuantLinear.from_float(nn.Linear(16, 4), MaxAbsWeightQuantizer(8), None)
    layer.pack()
    assert size_bytes(layer) == 64 * 1 + 4 * 4 + 4
    assert count_params(layer) == 64 + 4


def test_first_and_last_layers_stay_float_by_default(digits_context) -> None:
    model, ctx = digits_context()
    method = create_method("minmax_quant", {"bits": 4})
    model = method.prepare(model, ctx)
    assert type(model.features[0]) is nn.Conv2d
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.features[3], QuantConv2d) and isinstance(model.features[7], QuantConv2d)
    assert method.metrics() == {"bits": 4.0, "quantized_layers": 2.0}


def test_quantize_first_last_quantizes_every_layer(digits_context) -> None:
    model, ctx = digits_context()
    method = create_method("minmax_quant", {"bits": 4, "quantize_first_last": True})
    model = method.prepare(model, ctx)
    assert isinstance(model.features[0], QuantConv2d) and isinstance(model.classifier, QuantLinear)
    assert method.metrics()["quantized_layers"] == 4.0


def test_finalize_packs_every_quantized_layer_and_keeps_outputs(digits_context) -> None:
    model, ctx = digits_context()
    method = create_method("minmax_quant", {"bits": 4})
    model = method.prepare(model, ctx)
    _observed(model, ctx.train_loader[0][0])
    x = ctx.val_loader[0][0]
    params = count_params(model)
    with torch.no_grad():
        before = model(x)
    model = method.finalize(model, ctx)
    assert all(m.packed for m in (model.features[3], model.features[7]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert count_params(model) == params
    # conv2 (16*32*9) and conv3 (32*64*9) weights stored at 4 bits instead of 32.
    float_model, _ = digits_context()
    saved = (16 * 32 * 9 + 32 * 64 * 9) * (4 - 0.5)
    added = 2 * 4 + 2 * 4  # two float32 scales, two float32 running bounds
    assert size_bytes(float_model) - size_bytes(model) == saved - added


@pytest.mark.parametrize(("options", "quantized_bops"), [({}, 4 * 4), ({"quantize_activations": False}, 4 * 32)])
def test_bops_weigh_quantized_macs_by_their_bits_and_the_rest_by_32x32(digits_context, options: dict, quantized_bops: int) -> None:
    model, ctx = digits_context()
    float_count = count_flops(model, ctx.example_input)
    # digits_cnn on 8x8: conv 1->16 (9,216 MACs), 16->32 and 32->64 (294,912 each), linear 64->10 (640).
    assert float_count.macs == 599_680 and float_count.bops == 599_680 * 32 * 32
    method = create_method("minmax_quant", {"bits": 4, **options})
    model = method.prepare(model, ctx)
    expected = (9_216 + 640) * 32 * 32 + 2 * 294_912 * quantized_bops
    assert count_flops(model, ctx.example_input).bops == expected
    _observed(model, ctx.train_loader[0][0])
    model = method.finalize(model, ctx)
    assert count_flops(model, ctx.example_input).bops == expected


def test_latency_unpacks_each_packed_weight_once_and_keeps_no_copy(digits_context, monkeypatch) -> None:
    import copy

    import methods._quant as quant

    model, ctx = digits_context()
    method = create_method("minmax_quant", {"bits": 4})
    model = _observed(method.prepare(model, ctx), ctx.train_loader[0][0])
    model = method.finalize(model, ctx).eval()
    x = ctx.val_loader[0][0]
    with torch.no_grad():
        expected = model(x)
    calls = []
    real = quant.dequantize_packed
    monkeypatch.setattr(quant, "dequantize_packed", lambda *args: calls.append(1) or real(*args))
    latency_ms(model, x[:1], repeats=5, warmup=2)
    assert len(calls) == 2  # once per packed layer, not once per layer and pass (14)
    layers = quant.quantized_layers(model)
    assert all(layer._inference_weight is None for layer in layers)
    for layer in layers:
        layer.cache_inference_weight(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert all(layer._inference_weight is None for layer in quant.quantized_layers(copy.deepcopy(model)))


def test_2_bit_weights_keep_every_channel_when_one_weight_dominates_the_tensor() -> None:
    # With the bound max|W|, a 2-bit (ternary) code is nonzero only above max|W| / 2: one large
    # weight zeroed every other channel, the BatchNorm after a constant channel multiplied its
    # gradient by 1/sqrt(eps), its weights jumped, raised the max and zeroed more channels, until
    # the running variance overflowed and the loss became NaN.
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3) * 0.1
    weight[0, 0, 1, 1] = 3.0 * weight.abs().max()
    q = MaxAbsWeightQuantizer(2).eval()(weight)
    assert (q.flatten(1).abs().amax(dim=1) > 0).all()
    # The bound is TWN's (arXiv 1605.04711): codes are nonzero above 0.7 x mean|W|.
    bound = 1.4 * weight.abs().mean()
    torch.testing.assert_close(q, symmetric_quantize(weight, bound, 2, ste=False))
    # Other widths keep the max|W| bound.
    torch.testing.assert_close(MaxAbsWeightQuantizer(4).eval()(weight).abs().max(), weight.abs().max())


@pytest.mark.slow
def test_2_bit_quickstart_trial_that_ended_in_nan_trains_to_finite_loss() -> None:
    """The quickstart's baseline and 2-bit trial (seed 3): NaN in epoch 2 in a search, at chance here, before the fix."""
    from pathlib import Path

    from methods import Phase, Pipeline, train_phase
    from search.space.spec import load_space
    from search.trial.body import trainable_student
    from search.trial.context import build_context, build_model, load_task, seed_everything

    space = load_space(Path(__file__).resolve().parents[2] / "spaces" / "quickstart.yaml")
    task = load_task(space)
    seed_everything(0)
    baseline = build_model(space, task)
    ctx = build_context(space, task, teacher=baseline, device=torch.device("cpu"), seed=0, log=lambda m: None)
    train_phase(baseline, Phase("baseline", space.baseline_epochs), ctx, loss_terms=[], stage_name="baseline")
    baseline.eval().requires_grad_(False)
    seed_everything(3)
    model, ctx = trainable_student(space, task, baseline, torch.device("cpu"), 3)
    model = Pipeline.from_recipe([{"name": "minmax_quant", "params": {"bits": 2}}]).run(model, ctx)
    # Before the fix: NonFiniteLossError in the search's trial, at chance (0.097) here.
    assert task.evaluate(model, ctx.val_loader, "cpu")["accuracy"] > 0.5
