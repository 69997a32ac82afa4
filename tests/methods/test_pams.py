"""PAMS: the activation quantizer, where quantizers go, the knowledge transfer, packing and training."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deploy import check_round_trip, count_flops, count_params, export_model, load_module, size_bytes
from methods import Pipeline, create_method, training_loss
from methods._quant import QuantConv2d, quantized_layers
from methods.pams import (
    PAMSActivationQuantizer,
    QuantResBlock,
    activation_quantizers,
    attention_map,
    feature_module_name,
    pams_layers,
    skt_loss,
)
from models import create_model
from tasks import Task

from .conftest import frozen, make_context, trainable_copy

# --- the activation quantizer -------------------------------------------------------------------


def _quantizer(bits: int, alpha: float) -> PAMSActivationQuantizer:
    q = PAMSActivationQuantizer(bits)
    with torch.no_grad():
        q.alpha.fill_(alpha)
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_k_bit_quantizer_has_at_most_2_to_the_k_minus_1_levels(bits: int) -> None:
    q = _quantizer(bits, 2.0)
    x = torch.linspace(-3.0, 3.0, 20_001)
    for training in (True, False):
        levels = torch.unique(q.train(training)(x).detach())
        assert len(levels) == 2**bits - 1
        assert levels.min().item() == pytest.approx(-2.0) and levels.max().item() == pytest.approx(2.0)
    random = q(torch.randn(5000, generator=torch.Generator().manual_seed(bits)) * 3)
    assert len(torch.unique(random)) <= 2**bits - 1
    # Training (straight-through) and inference (fewer ops, for export) give the same values.
    torch.testing.assert_close(q.train()(x), q.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ste_gradient_is_one_inside_alpha_and_zero_outside(bits: int) -> None:
    q = _quantizer(bits, 2.0)
    x = torch.tensor([-1.9, -0.7, -0.01, 0.0, 0.3, 1.2, 1.99, -2.5, 2.5, 10.0], requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0] * 7 + [0.0] * 3))


def test_alpha_gradient_is_the_clipped_count_plus_the_rounding_path() -> None:
    bits, alpha = 3, 2.0
    levels = 2 ** (bits - 1) - 1
    q = _quantizer(bits, alpha)
    outside = torch.tensor([2.5, 3.0, 10.0, -4.0])  # d q / d alpha = sign(x) where |x| >= alpha
    q(outside).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(3 - 1)
    q.alpha.grad = None
    inside = torch.tensor([0.3, -0.9, 1.1, 1.7])  # d/d alpha of round(u) alpha / L with u = x L / alpha
    q(inside).sum().backward()
    u = inside * levels / alpha
    expected = ((torch.round(u) - u) / levels).sum().item()
    assert q.alpha.grad.item() == pytest.approx(expected, abs=1e-6)
    assert expected != 0


def test_calibration_sets_alpha_to_the_batch_mean_of_per_sample_max_and_rounds_unclipped() -> None:
    q = PAMSActivationQuantizer(2)  # qmax 1: the grid step is alpha itself
    assert q.alpha.item() == 10.0
    q.calibrating = True
    x = torch.tensor([[1.0, -3.0], [0.5, 2.0], [-7.0, 1.0]]).reshape(3, 2, 1, 1).requires_grad_()
    out = q.train()(x)
    assert q.alpha.item() == pytest.approx((3.0 + 2.0 + 7.0) / 3)
    # Multiples of alpha = 4, not clipped to [-4, 4] (-7 becomes -8, beyond qmax), as the official code.
    assert out.flatten().tolist() == [0.0, -4.0, 0.0, 0.0, -8.0, 0.0]  # 2 / 4 rounds half to even
    out.sum().backward()
    assert x.grad.flatten().tolist() == [1.0] * 6 and q.alpha.grad is None  # straight-through; alpha is not learned yet
    evaluated = q.eval()(x.detach() * 100)  # evaluation does not calibrate, and quantizes with clipping
    assert q.alpha.item() == pytest.approx(4.0)
    assert evaluated.flatten().tolist() == [4.0, -4.0, 4.0, 4.0, -4.0, 4.0]
    q.calibrating = False
    q.bits = 4
    assert len(torch.unique(q(torch.linspace(-10, 10, 1001)))) == 15


# --- where quantizers go ------------------------------------------------------------------------


def test_edsr_blocks_get_the_papers_three_quantizers_and_the_rest_stays_float() -> None:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2)
    method = create_method("pams", {"bits": 4})
    fp = copy.deepcopy(model)
    ctx = make_context(frozen(copy.deepcopy(model)), [], [], Task("sr", 0, (3, 8, 8), None, None, None), torch.zeros(1, 3, 8, 8))
    model = method.prepare(model, ctx)
    blocks = [m for m in model.body if isinstance(m, QuantResBlock)]
    assert len(blocks) == 4
    for block in blocks:
        assert isinstance(block.quant_in, PAMSActivationQuantizer) and isinstance(block.quant_out, PAMSActivationQuantizer)
        assert block.conv1.input_quantizer is None  # conv1 reads quant_in's output
        assert isinstance(block.conv2.input_quantizer, PAMSActivationQuantizer)  # after the ReLU
    assert len(activation_quantizers(model)) == 12 and len(quantized_layers(model)) == 8
    for name in ("head", "body.4", "tail.0.0", "tail.1"):
        assert type(model.get_submodule(name)) is nn.Conv2d
    # The student starts from the full-precision weights (the official code forgets to).
    torch.testing.assert_close(model.body[0].conv1.weight, fp.body[0].conv1.weight, atol=0, rtol=0)
    # Block output = quant_out(res_scale * conv2(quant(relu(conv1(x_q))))) + x_q.
    model.eval()
    block = model.body[1]
    x = torch.randn(2, 32, 6, 6) * 5
    with torch.no_grad():
        xq = block.quant_in(x)
        body = nn.functional.conv2d(
            block.conv2.input_quantizer(torch.relu(block.conv1(xq))), block.conv2.quantized_weight(), block.conv2.bias, padding=1
        )
        torch.testing.assert_close(block(x), block.quant_out(body) + xq)
    assert method.metrics() == {"bits": 4.0, "quantized_layers": 8.0}
    # Both convs of a block multiply 4-bit weights by 4-bit inputs; bops count the rest at 32 x 32.
    assert {layer.operand_bits() for layer in quantized_layers(model)} == {(4, 4)}
    count, float_count = count_flops(model, torch.zeros(1, 3, 8, 8)), count_flops(fp, torch.zeros(1, 3, 8, 8))
    block_macs = 8 * 32 * 32 * 9 * 8 * 8  # 8 convs of 32 -> 32 channels, 3x3, on 8x8
    assert count.macs == float_count.macs and float_count.bops == float_count.macs * 1024
    assert count.bops == (count.macs - block_macs) * 1024 + block_macs * 16


def test_resnet_rdn_and_plain_models_quantize_the_documented_convolutions() -> None:
    x32 = torch.zeros(1, 3, 32, 32)
    blocks, convs = pams_layers(create_model("resnet20", 10), x32)
    assert blocks == [] and len(convs) == 18 and "conv1" not in convs and all(".conv" in c for c in convs)
    blocks, convs = pams_layers(create_model("rdn_small", scale=2), torch.zeros(1, 3, 8, 8))
    assert blocks == [] and len(convs) == 4 * (4 + 1)  # D blocks of C dense convs plus the 1x1 fusion
    assert all(c.startswith("rdbs.") for c in convs)
    blocks, convs = pams_layers(create_model("digits_cnn", 10, in_channels=1), torch.zeros(1, 1, 8, 8))
    assert (blocks, convs) == ([], ["features.3", "features.7"])  # no residual blocks: all but first and output
    assert pams_layers(create_model("edsr_small", scale=3), torch.zeros(1, 3, 8, 8)) == ([f"body.{i}" for i in range(4)], [])


def test_feature_map_of_the_knowledge_transfer() -> None:
    assert feature_module_name(create_model("edsr_small", scale=2)) == "body_out"
    assert feature_module_name(create_model("rdn_small", scale=2)) == "body_out"
    assert feature_module_name(create_model("resnet20", 10)) == "layer3.2"
    assert feature_module_name(create_model("digits_cnn", 10, in_channels=1)) == "features"
    assert feature_module_name(create_model("torchvision:resnet18", 10)) == "layer4.1"


# --- structured knowledge transfer --------------------------------------------------------------


def test_skt_loss_compares_normalised_spatial_attention() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 8, 5, 5, generator=g)
    a = attention_map(f)
    assert a.shape == (2, 25)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a[0], (f[0] ** 2).mean(0).flatten() / (f[0] ** 2).mean(0).norm())
    assert skt_loss(f, f).item() == 0.0
    assert skt_loss(3 * f, f).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert skt_loss(f[:, :4], f).item() > 0  # channel counts may differ (pruned student)
    g2 = torch.randn(2, 8, 5, 5, generator=g)
    assert skt_loss(g2, f).item() > 1e-3


def _sr_context(epochs: int = 1, batches: int = 4):
    """A briefly trained edsr_small x2 teacher on smooth random images; (teacher, ctx)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    hr = nn.functional.avg_pool2d(torch.rand(batches * 4, 3, 24, 24, generator=g) * 255, 3, stride=1, padding=1)
    lr = nn.functional.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True)
    data = [(lr[i * 4 : (i + 1) * 4], hr[i * 4 : (i + 1) * 4]) for i in range(batches)]
    task = Task("sr", 0, (3, 12, 12), None, None, None)
    teacher = create_model("edsr_small", scale=2, n_feats=16, n_resblocks=2)
    ctx = make_context(teacher, data, data[:1], task, torch.zeros(1, 3, 12, 12), epochs=epochs, lr=1e-3)
    ctx.task_loss = nn.functional.l1_loss
    ctx.evaluate = lambda model: {"psnr": 0.0, "loss": 0.0}
    ctx.optimizer = "adam"
    from methods import Phase, train_phase

    train_phase(teacher, Phase("fp", 3), ctx, loss_terms=[])
    ctx.teacher = frozen(teacher)
    return teacher, ctx


def test_skt_term_is_added_to_the_task_loss() -> None:
    teacher, ctx = _sr_context()
    from methods import Step

    for weight in (0.0, 1e3):
        method = create_method("pams", {"bits": 2, "skt_weight": weight})
        model = method.prepare(trainable_copy(teacher), ctx)
        inputs, targets = ctx.train_loader[0]
        step = Step(model, inputs, targets, ctx, [method.loss], 0, 0, capture=method.feature_modules())
        loss = training_loss(method.phases(ctx)[-1], step)
        task = nn.functional.l1_loss(step.outputs, targets)
        if weight == 0:
            assert loss.item() == pytest.approx(task.item())
        else:
            with torch.no_grad():
                features = {}
                for name, net in (("s", model), ("t", teacher)):
                    handle = net.body_out.register_forward_hook(lambda m, i, o, name=name: features.setdefault(name, o))
                    net(inputs)
                    handle.remove()
            assert loss.item() == pytest.approx(task.item() + weight * skt_loss(features["s"], features["t"]).item(), rel=1e-5)
            assert loss.item() > task.item()


# --- packing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sr_context():
    return _sr_context()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_export_round_trips_and_size_bytes_counts_the_packed_bytes(sr_context, tmp_path: Path, bits: int) -> None:
    teacher, ctx = sr_context
    method = create_method("pams", {"bits": bits, "stats_epochs": 1, "epochs": 1})
    model = trainable_copy(teacher)
    model = method.prepare(model, ctx)
    with torch.no_grad():
        model.train()(ctx.train_loader[0][0])  # calibrates alpha on a batch
    method._end_calibration(model)
    x = ctx.val_loader[0][0]
    model.eval()
    with torch.no_grad():
        fake = model(x)
    params = count_params(model)
    model = method.finalize(model, ctx)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake, atol=1e-5, rtol=0)
    layers = quantized_layers(model)
    assert all(layer.packed for layer in layers)
    packed_bytes = 0
    for layer in layers:
        codes = layer.weight_codes
        assert codes.dtype == torch.int8 and codes.abs().max().item() <= 2 ** (bits - 1) - 1
        buffer = layer.weight_codes if bits == 8 else layer.weight_packed
        assert buffer.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert buffer.numel() == math.ceil(codes.numel() * bits / 8)  # 8/k codes a byte, 3 bits straddle
        packed_bytes += buffer.numel()
    float_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    assert size_bytes(model) == packed_bytes + float_bytes
    assert count_params(model) == params  # the packed weights are still parameters
    files = export_model(model, torch.zeros(1, 3, 12, 12), tmp_path, {})
    assert check_round_trip(tmp_path, x) <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(load_module(tmp_path).eval()(x), fake, atol=1e-5, rtol=0)
    assert files["model.pt2"] > 0


def test_artifact_bytes_fall_with_bits(tmp_path: Path) -> None:
    """EDSR-baseline-wide layers (64 channels): the weights, not the graph, dominate the program."""
    torch.manual_seed(0)
    fp = create_model("edsr_small", scale=2, n_feats=64, n_resblocks=2).eval()
    x = torch.zeros(1, 3, 12, 12)
    ctx = make_context(frozen(copy.deepcopy(fp)), [], [], Task("sr", 0, (3, 12, 12), None, None, None), x)
    artifacts, sizes = [], []
    for bits in (None, 8, 4, 2):
        model = copy.deepcopy(fp)
        if bits is not None:
            method = create_method("pams", {"bits": bits})
            model = method.finalize(method.prepare(model, ctx), ctx)
        artifacts.append(export_model(model, x, tmp_path / str(bits), {})["model.pt2"])
        sizes.append(size_bytes(model))
    assert artifacts == sorted(artifacts, reverse=True) and len(set(artifacts)) == 4
    assert sizes == sorted(sizes, reverse=True)
    # Two blocks' four 64x64x3x3 convs: 4 bytes per weight in float, bits/8 when packed.
    weights = 4 * 64 * 64 * 9
    assert sizes[0] - sizes[2] == weights * 4 - weights // 2 - 4 * 4 - 6 * 4  # minus 4 scales and 6 alphas


# --- training -----------------------------------------------------------------------------------


def test_alpha_starts_from_statistics_then_learns_to_clip(sr_context) -> None:
    teacher, ctx = sr_context
    method = create_method("pams", {"bits": 2, "stats_epochs": 1, "epochs": 6, "alpha_lr": 0.5, "skt_weight": 1e3})
    torch.manual_seed(0)
    Pipeline([method]).run(trainable_copy(teacher), ctx)
    start, end = method._alpha_start, method._alpha_end
    assert len(start) == len(end) == 6
    assert all(s != 10.0 for s in start)  # overwritten by the max statistic during calibration
    assert sum(e < s for s, e in zip(start, end)) >= 4  # most bounds now clip below the calibrated max
    assert method.metrics()["alpha_ratio"] < 1.0


def test_l1_filter_then_pams_on_resnet20(cifar_context, tmp_path: Path) -> None:
    model, ctx = cifar_context()
    pipeline = Pipeline([create_method("l1_filter", {"ratio": 0.5}), create_method("pams", {"bits": 4, "epochs": 1})])
    torch.manual_seed(0)
    model = pipeline.run(model, ctx).eval()
    assert model.layer1[0].conv1.out_channels == 8  # pruned, then quantized
    layers = quantized_layers(model)
    assert len(layers) == 18 and all(layer.packed and isinstance(layer, QuantConv2d) for layer in layers)
    assert all(isinstance(layer.input_quantizer, PAMSActivationQuantizer) for layer in layers)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert model(x).shape == (3, 10)
    export_model(model, torch.zeros(1, 3, 32, 32), tmp_path, {})
    assert check_round_trip(tmp_path, x) <= 1e-5
    metrics = pipeline.metrics()
    assert metrics["pams.bits"] == 4.0 and metrics["pams.quantized_layers"] == 18.0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="`2 <= bits <= 8` must hold"):
        create_method("pams", {"bits": 1})
    with pytest.raises(ValueError, match="`skt_weight >= 0` must hold"):
        create_method("pams", {"skt_weight": -1.0})
    with pytest.raises(ValueError, match="`optimizer` must be one of adam, sgd, but got 'rmsprop'"):
        create_method("pams", {"optimizer": "rmsprop"})
    method = create_method("pams", {"stats_epochs": 0, "epochs": 3})
    assert [p.name for p in method.phases(None)] == ["qat"]


def test_unset_epochs_take_the_space_budget() -> None:
    space = SimpleNamespace(epochs=7)
    assert [(p.name, p.epochs) for p in create_method("pams").phases(space)] == [("calibrate", 1), ("qat", 7)]
    with pytest.raises(ValueError, match=r"`epochs >= 0` must hold, but got epochs=-1"):
        create_method("pams", {"epochs": -1})
