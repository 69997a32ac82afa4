"""The ONNX form: a float model round-trips through ONNX Runtime, a quantized trial's model becomes
an integer QDQ model with its own scales that runs on integer kernels, at the trial's accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from deploy import FORMS, check_round_trip, export_model, load_form, optimized_op_types
from methods import Phase, Pipeline, create_method, train_phase
from models import create_model
from tasks import create_task
from tests.methods.conftest import frozen, make_context, trainable_copy


@pytest.fixture(scope="module")
def digits():
    """The digits task and a ``digits_cnn`` trained 3 epochs on it."""
    task = create_task("digits")
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1)
    loader = DataLoader(task.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    ctx = make_context(model, loader, list(DataLoader(task.val_set, batch_size=256)), task, task.example_input(1), lr=0.05)
    train_phase(model, Phase("baseline", 3), ctx, loss_terms=[])
    return task, frozen(model), loader


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    """``exported(method, bits) -> (model, export dir)``: the baseline fine-tuned one epoch by the method, exported with ONNX."""
    task, baseline, loader = digits
    cache: dict[tuple[str, int], tuple[nn.Module, Path]] = {}

    def get(method: str, bits: int) -> tuple[nn.Module, Path]:
        if (method, bits) not in cache:
            torch.manual_seed(0)
            val = list(DataLoader(task.val_set, batch_size=256))
            ctx = make_context(baseline, loader, val, task, task.example_input(1), epochs=1, lr=0.01)
            model = Pipeline([create_method(method, {"bits": bits})]).run(trainable_copy(baseline), ctx).eval()
            out = tmp_path_factory.mktemp(f"{method}{bits}")
            export_model(model, task.example_input(1), out, onnx=True)
            cache[method, bits] = model, out
        return cache[method, bits]

    return get


def accuracy(task, model) -> float:
    return task.evaluate(model, DataLoader(task.test_set, batch_size=512), "cpu")["accuracy"]


class _Runner(nn.Module):
    """A loaded form as a module, for ``Task.evaluate``."""

    def __init__(self, run) -> None:
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def test_float_model_round_trips_with_a_dynamic_batch(digits, tmp_path) -> None:
    task, baseline, _ = digits
    files = export_model(baseline, task.example_input(1), tmp_path, onnx=True)
    assert files[FORMS["onnx"]] == (tmp_path / "model.onnx").stat().st_size > 0
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert check_round_trip(tmp_path, x, forms=("program", "onnx")) <= 1e-4 * max(1.0, float(baseline(x).abs().max()))
    optimized = load_form(tmp_path, "onnx", threads=1)(x)  # batch 5 though exported at 2: dynamic
    assert torch.allclose(optimized, baseline(x), atol=1e-4)


def test_export_without_onnx_writes_no_onnx_file(digits, tmp_path) -> None:
    task, baseline, _ = digits
    assert FORMS["onnx"] not in export_model(baseline, task.example_input(1), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_int8_model_runs_integer_kernels_at_the_trials_accuracy(digits, exported) -> None:
    task = digits[0]
    model, out = exported("minmax_quant", 8)
    assert "QLinearConv" in optimized_op_types(out / "model.onnx")
    deployed = accuracy(task, _Runner(load_form(out, "onnx", threads=1)))
    assert abs(deployed - accuracy(task, model)) <= 0.003


def test_quantized_model_carries_the_trials_codes_and_scales(exported) -> None:
    import onnx
    from onnx import numpy_helper

    model, out = exported("minmax_quant", 4)
    graph = onnx.load(out / "model.onnx").graph
    codes = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".codes")]
    layers = [m for m in model.modules() if hasattr(m, "weight_codes")]
    assert len(codes) == len(layers) == 2
    for stored, layer in zip(codes, layers):
        # The batch norm after each layer is folded into its scales, so codes keep their magnitudes.
        assert (abs(stored) == layer.weight_codes.abs().numpy()).all()
        assert abs(stored).max() <= 7  # 4-bit codes, run by int8 kernels
    bounds = sorted(float(m.running_bound) for m in model.modules() if hasattr(m, "running_bound"))
    scales = {round(float(numpy_helper.to_array(i)), 6) for i in graph.initializer if i.data_type == 1 and not i.dims}
    assert all(round(b / 7, 6) in scales for b in bounds)


@pytest.mark.parametrize("bits", [4, 3])
def test_narrow_widths_run_int8_kernels_exactly_as_written(digits, exported, bits: int) -> None:
    model, out = exported("minmax_quant", bits)
    assert "QLinearConv" in optimized_op_types(out / "model.onnx")
    x = digits[0].test_set.tensors[0][:64]
    assert check_round_trip(out, x, forms=("onnx",)) <= 1e-4 * max(1.0, float(model(x).abs().max()))


@pytest.fixture(scope="module")
def residuals(digits, tmp_path_factory):
    """``residuals(first_last) -> (model, export dir)``: a ``resnet20`` trained 2 epochs on digits, fine-tuned one
    epoch by ``minmax_quant`` at 8 bits (``quantize_first_last`` as given), exported with ONNX."""
    task, _, loader = digits
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    val = list(DataLoader(task.val_set, batch_size=256))
    ctx = make_context(model, loader, val, task, task.example_input(1), lr=0.05)
    train_phase(model, Phase("baseline", 2), ctx, loss_terms=[])
    baseline = frozen(model)
    cache: dict[bool, tuple[nn.Module, Path]] = {}

    def get(first_last: bool) -> tuple[nn.Module, Path]:
        if first_last not in cache:
            torch.manual_seed(0)
            ctx = make_context(baseline, loader, val, task, task.example_input(1), epochs=1, lr=0.01)
            method = create_method("minmax_quant", {"bits": 8, "quantize_first_last": first_last})
            quantized = Pipeline([method]).run(trainable_copy(baseline), ctx).eval()
            out = tmp_path_factory.mktemp(f"resnet20_int8_{first_last}")
            export_model(quantized, task.example_input(1), out, onnx=True)
            cache[first_last] = quantized, out
        return cache[first_last]

    return get


def test_residual_int8_model_runs_integer_sums_at_the_trials_accuracy(digits, residuals) -> None:
    import onnx

    task = digits[0]
    model, out = residuals(False)
    ops = [node.op_type for node in onnx.load(out / "model.onnx").graph.node]
    optimized = optimized_op_types(out / "model.onnx")
    # Every quantized convolution and every residual sum but the last (whose output reaches no quantizer) is integer.
    assert optimized["QLinearConv"] == ops.count("Conv") - 2 and optimized["QLinearAdd"] == ops.count("Add") - 1
    assert optimized["Relu"] == 1  # each ReLU before a uint8 quantizer is dropped; the last block's stays
    deployed = accuracy(task, _Runner(load_form(out, "onnx", threads=1)))
    assert abs(deployed - accuracy(task, model)) <= 0.003


def test_int8_model_with_first_and_last_quantized_runs_integer_throughout(digits, residuals) -> None:
    import onnx

    task = digits[0]
    model, out = residuals(True)
    ops = [node.op_type for node in onnx.load(out / "model.onnx").graph.node]
    optimized = optimized_op_types(out / "model.onnx", layout=True)
    # Only the last block's second convolution and sum stay float: their output reaches the classifier through the
    # average pool, which does not commute with rounding. The downsampling shortcuts' slices, zero channels and
    # concatenations run on codes.
    assert optimized["QLinearConv"] == ops.count("Conv") - 1 and optimized["QLinearAdd"] == ops.count("Add") - 1
    assert optimized["QLinearConcat"] == ops.count("Concat") == 2 and optimized["QLinearMul"] == 2
    assert optimized["Concat"] == optimized["Mul"] == 0
    # NHWC throughout: one Transpose into the stem, a pair around the last (float) block (3 measured).
    assert optimized["Transpose"] <= 3
    # With what the export added undone (the zero channels' codes too), it is the trial's model (check_onnx).
    x = task.test_set.tensors[0][:64]
    assert check_round_trip(out, x, forms=("onnx",)) <= 0.05 * max(1.0, float(model(x).abs().max()))
    deployed = accuracy(task, _Runner(load_form(out, "onnx", threads=1)))
    assert abs(deployed - accuracy(task, model)) <= 0.003
