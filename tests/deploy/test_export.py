"""Exporting a compressed model: both artifacts reload to the same function, the recipe survives,
packing shrinks the deployable file, the program is folded for inference and loads without slimtune,
and ``load_program`` unpacks packed weights once, at load."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deploy import (
    EXPORT_FILES,
    check_round_trip,
    compile_program,
    cpp_compiler,
    export_model,
    inference_copy,
    load_compiled,
    load_module,
    load_program,
    size_bytes,
    storage_groups_quiet,
)
from deploy._rewrites import conv_batch_norm_pairs, trace_program
from errors import UserError
from methods import Phase, Pipeline, train_phase
from methods._quant import MaxAbsWeightQuantizer, QuantConv2d, QuantLinear, RunningMaxActivationQuantizer
from models import create_model
from search.space.spec import load_space
from search.trial.context import build_context, build_model, load_task

ROOT = Path(__file__).resolve().parents[2]
RECIPE = [{"name": "l1_filter", "params": {"ratio": 0.5}}, {"name": "minmax_quant", "params": {"bits": 8}}]


@pytest.fixture(scope="module")
def setting():
    """The quickstart's task and model, a baseline trained 2 epochs, and a trial context of 2 batches."""
    space = load_space(ROOT / "spaces" / "quickstart.yaml")
    space = space.with_overrides(budget=type(space.budget)(epochs=1))
    task = load_task(space)
    torch.manual_seed(0)
    baseline = build_model(space, task)
    ctx = build_context(space, task, teacher=baseline, device=torch.device("cpu"), seed=0, log=lambda m: None)
    train_phase(baseline, Phase("baseline", 2), ctx, loss_terms=[])
    baseline.eval()
    for p in baseline.parameters():
        p.requires_grad_(False)
    batches = [batch for batch, _ in zip(ctx.train_loader, range(2))]
    ctx.train_loader = batches
    ctx.evaluate = lambda model: task.evaluate(model, batches[:1], "cpu")
    return space, task, baseline, ctx


def _compress(setting, recipe) -> nn.Module:
    _, _, baseline, ctx = setting
    model = copy.deepcopy(baseline).train()
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    return Pipeline.from_recipe(recipe).run(model, ctx).eval()


@pytest.fixture(scope="module")
def exported(setting, tmp_path_factory):
    space, task, _, _ = setting
    model = _compress(setting, RECIPE)
    out = tmp_path_factory.mktemp("export")
    recipe = {"recipe": RECIPE, "space": space.name, "task": space.task, "model": space.model}
    files = export_model(model, task.example_input(1), out, recipe)
    return model, out, recipe, files


def test_export_writes_every_file(exported) -> None:
    _, out, _, files = exported
    assert sorted(files) == sorted(EXPORT_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert all(files[name] == (out / name).stat().st_size > 0 for name in EXPORT_FILES)


def test_both_artifacts_reproduce_the_model_on_a_batch_of_5(exported, setting) -> None:
    model, out, _, _ = exported
    _, _, _, ctx = setting
    batch = ctx.train_loader[0][0][:5]
    assert batch.shape == (5, 1, 8, 8)  # traced with a batch of 2: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(batch)
        from_program = load_program(out)(batch)
        from_module = load_module(out).eval()(batch)
    assert expected.shape == (5, 10)
    torch.testing.assert_close(from_program, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_module, expected, atol=1e-5, rtol=0)
    assert check_round_trip(out, batch) <= 1e-5


def test_exported_model_is_pruned_and_packed(exported) -> None:
    _, out, _, _ = exported
    module = load_module(out)
    assert module.features[3].packed and module.features[3].weight_codes.dtype == torch.int8
    assert (module.features[0].out_channels, module.classifier.out_features) == (8, 10)
    state = torch.load(out / "state_dict.pt", weights_only=True)
    assert state["features.3.weight_codes"].shape == (16, 8, 3, 3)
    assert "features.3.weight" not in state


def test_recipe_json_is_preserved(exported) -> None:
    _, out, recipe, _ = exported
    assert json.loads((out / "recipe.json").read_text()) == recipe


def _tensor_bytes(pt2: Path) -> int:
    """Bytes of the tensors a ``.pt2`` program holds (its weights, buffers and constants).

    Read from the loaded program, not from the archive's entries: how the archive lays them out
    changed across PyTorch releases (one pickle of all weights in 2.8, a raw file per tensor in later
    releases), what it holds did not.
    """
    program = torch.export.load(pt2)
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def test_packed_8_bit_program_is_smaller_than_the_float_one(setting, tmp_path: Path) -> None:
    _, task, baseline, _ = setting
    quantized = _compress(setting, [{"name": "minmax_quant", "params": {"bits": 8}}])
    float_size = export_model(baseline, task.example_input(1), tmp_path / "float", {})["model.pt2"]
    packed_size = export_model(quantized, task.example_input(1), tmp_path / "int8", {})["model.pt2"]
    assert packed_size < float_size
    # conv2 and conv3 (4,608 + 18,432 weights) are stored as int8 codes: 3 bytes less per weight,
    # less the two scales and two activation bounds (4 bytes each) that packing adds.
    saved = 3 * (4_608 + 18_432) - 4 * 4
    assert size_bytes(baseline) - size_bytes(quantized) == saved
    # The program holds the inference copy: batch norms folded where the layer before is a plain
    # convolution (all three in float; in int8 only the first, before the unquantized conv1). Its
    # tensors are what size_bytes counts for that copy, plus each remaining batch norm's int64
    # step counter (8 bytes), which size_bytes leaves out.
    for name, model, batch_norms in (("float", baseline, 0), ("int8", quantized, 2)):
        deployed = inference_copy(model, task.example_input(1))[0]
        assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == batch_norms
        assert _tensor_bytes(tmp_path / name / "model.pt2") == size_bytes(deployed) + 8 * batch_norms


def test_exported_program_runs_in_eval_mode_and_has_no_eval(tmp_path: Path) -> None:
    # What the README tells users: call the program directly; .eval() raises in this PyTorch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 3))
    model(torch.randn(16, 1, 8, 8))  # training-mode pass: running statistics move away from 0 and 1
    model.train()
    export_model(model, torch.randn(1, 1, 8, 8), tmp_path)
    assert model.training  # export_model restores the mode
    program = load_program(tmp_path)
    with pytest.raises(NotImplementedError, match="eval"):
        program.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(program(x), expected, atol=1e-6, rtol=0)  # dropout off, running statistics
        torch.testing.assert_close(program(x), program(x), atol=0, rtol=0)


class _Residual(nn.Module):
    """conv1 -> bn1 folds; conv2's output also feeds the addition, so bn2 must stay; a dropout goes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        z = self.bn2(z) + z
        return self.head(self.drop(z.mean(dim=(2, 3))))


def _with_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with running statistics and affine weights far from their initial 0 and 1."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-2, 2)
            module.running_var.uniform_(0.1, 4)
            nn.init.uniform_(module.weight, 0.5, 2)
            nn.init.uniform_(module.bias, -1, 1)
    return model


def test_inference_copy_folds_batch_norm_and_keeps_the_outputs() -> None:
    model = _with_statistics(_Residual()).train()
    x = torch.randn(6, 2, 5, 5)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    folded, rewrites = inference_copy(model, x[:1])
    assert (rewrites.folded_batch_norms, rewrites.removed_dropouts, rewrites.channels_last) == (1, 1, True)
    assert folded.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training and isinstance(model.bn1, nn.BatchNorm2d)  # the model itself is untouched
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.drop, nn.Identity)
    assert isinstance(folded.bn2, nn.BatchNorm2d)  # its convolution's output is read twice
    assert not torch.equal(folded.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=0)
    assert rewrites.max_abs_diff <= 1e-5


class _SharedBlock(nn.Module):
    """The same conv -> bn block run twice, and a conv -> bn pair whose convolution shares its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.conv.weight = self.block[0].weight
        self.last, self.last_bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_bn(self.last(self.bn(self.conv(self.block(self.block(x))))))


@pytest.mark.parametrize(
    ("name", "shape"), [("digits_cnn", (1, 8, 8)), ("digits_resnet", (1, 8, 8)), ("resnet20", (3, 32, 32)), ("vgg16", (3, 32, 32))]
)
def test_an_eager_pass_finds_the_batch_norm_pairs_a_trace_finds(name: str, shape: tuple[int, ...]) -> None:
    """What lets the export trace once: the pairs to fold come from one eager forward pass, the same as from a trace."""
    model = create_model(name, num_classes=10, in_channels=shape[0]).eval()
    x = torch.randn(1, *shape)
    found = conv_batch_norm_pairs(model, x)
    assert found == conv_batch_norm_pairs(model, trace_program(model, x))
    assert len(found) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # these models fold every batch norm


@pytest.mark.parametrize("model", [_Residual(), _SharedBlock()], ids=["residual", "shared"])
def test_an_eager_pass_leaves_what_a_trace_leaves(model: nn.Module) -> None:
    """A convolution read twice, a block run twice and a shared weight do not fold, found either way."""
    x = torch.randn(1, 2, 5, 5)
    found = conv_batch_norm_pairs(model.eval(), x)
    assert found == conv_batch_norm_pairs(model, trace_program(model, x))
    assert found == ([("conv1", "bn1")] if isinstance(model, _Residual) else [("last", "last_bn")])


def test_the_export_traces_the_model_once_and_writes_the_same_program(tmp_path: Path, monkeypatch) -> None:
    """One ``torch.export.export`` per export (there were two: one more to find the batch norms to fold)."""
    model = create_model("digits_resnet", num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 8, 8)
    # The program the export wrote when a trace found the pairs: the folded copy, traced.
    rewritten, _ = inference_copy(model, x)
    expected = trace_program(rewritten, x)
    traces = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: traces.append(1) or real(*a, **k))
    export_model(model, x, tmp_path / "export")
    assert len(traces) == 1
    (tmp_path / "before").mkdir()
    with storage_groups_quiet():
        torch.export.save(expected, tmp_path / "before" / "model.pt2")
    assert (tmp_path / "export" / "model.pt2").read_bytes() == (tmp_path / "before" / "model.pt2").read_bytes()


class _LayoutSensitive(nn.Module):
    """A convolution, then a step that stands for rounding flipped by the layout's summation order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + float(y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous())


def test_inference_copy_keeps_the_default_layout_when_channels_last_moves_the_outputs() -> None:
    model = _LayoutSensitive()
    copy_, rewrites = inference_copy(model, torch.randn(1, 2, 6, 6))
    assert not rewrites.channels_last and rewrites.max_abs_diff == 0.0
    assert copy_.conv.weight.is_contiguous()


def test_the_default_program_loads_without_slimtune_and_matches(tmp_path: Path, monkeypatch) -> None:
    model = _with_statistics(_Residual()).eval()
    x = torch.randn(5, 2, 5, 5)
    export_model(model, x[:1], tmp_path)
    with torch.no_grad():
        expected = model(x)
    # Loading and running it imports nothing of slimtune: its packages are made unimportable.
    for name in [n for n in sys.modules if n.split(".")[0] in ("errors", "models", "tasks", "deploy", "methods", "search")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("errors", "models", "tasks", "deploy", "methods", "search"):
        monkeypatch.setitem(sys.modules, name, None)
    program = torch.export.load(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=0)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("aten.batch_norm.default") == 1 and not any("dropout" in t for t in targets)


@pytest.mark.skipif(os.environ.get("SLIMTUNE_AOT") != "1", reason="compiling with AOTInductor takes 30-60 s; set SLIMTUNE_AOT=1")
def test_the_compiled_form_matches_the_module(tmp_path: Path) -> None:
    if cpp_compiler() is None:
        pytest.skip("no C++ compiler")
    model = _with_statistics(_Residual()).eval()
    export_model(model, torch.zeros(1, 2, 5, 5), tmp_path)
    assert compile_program(tmp_path) == tmp_path / "model_compiled.pt2"
    compiled = load_compiled(tmp_path)
    x = torch.randn(7, 2, 5, 5)  # another batch size than traced: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert check_round_trip(tmp_path, x, forms=("program", "compiled")) <= 1e-5


def test_compiling_without_a_cpp_compiler_says_so(tmp_path: Path, monkeypatch) -> None:
    export_model(_Residual().eval(), torch.zeros(1, 2, 5, 5), tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler.*deploy the plain program model.pt2"):
        compile_program(tmp_path)
    assert not (tmp_path / "model_compiled.pt2").exists()


class _Packed(nn.Module):
    """A float conv, a packed conv whose input is fake-quantized, and a packed weight-only linear head."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        conv2 = QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1), MaxAbsWeightQuantizer(bits), RunningMaxActivationQuantizer(bits))
        self.conv2, self.head = conv2, QuantLinear.from_float(nn.Linear(4, 3), MaxAbsWeightQuantizer(bits), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


# What unpacking packed codes runs: casts, shifts, masks, the shift tables and the field sums.
_UNPACKING = (
    "aten.to.",
    "aten._to_copy.",
    "aten.__rshift__.",
    "aten.__lshift__.",
    "aten.__and__.",
    "aten.bitwise_",
    "aten.arange.",
    "aten.sum.",
)


def _calls(program: nn.Module) -> list[str]:
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_load_program_unpacks_packed_weights_once_and_keeps_the_outputs(bits: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Packed(bits)
    model(torch.randn(8, 2, 6, 6))  # training mode: the activation quantizer records its range
    model.conv2.pack()
    model.head.pack()
    export_model(model.eval(), torch.randn(1, 2, 6, 6), tmp_path)
    plain = torch.export.load(tmp_path / "model.pt2").module()
    loaded = load_program(tmp_path, device="cpu")  # through move_to_device_pass
    unpacking = [target for target in _calls(plain) if target.startswith(_UNPACKING)]
    assert len(unpacking) >= 2  # both packed layers unpack in every call of the plain program
    assert [target for target in _calls(loaded) if target.startswith(_UNPACKING)] == []
    read = {node.target for node in loaded.graph.nodes if node.op == "get_attr"}
    assert not any(name.endswith(("weight_codes", "weight_packed")) for name in read)
    # The input's fake quantization (clamp, round) is the float emulation of integer activations: per call.
    assert _calls(loaded).count("aten.round.default") == _calls(plain).count("aten.round.default") == 1
    assert _calls(loaded).count("aten.conv2d.default") == 2 and _calls(loaded).count("aten.linear.default") == 1
    x = torch.randn(5, 2, 6, 6)  # another batch size than traced: the batch dimension stays dynamic
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)
    folded = [loaded.get_buffer(name) for name in read if name.startswith("_folded_weight")]
    unpacked = [w for w in folded if w.dim()]  # the others: the activation quantizer's step, from its bound
    assert sorted(tuple(w.shape) for w in unpacked) == [(3, 4), (4, 4, 3, 3)]
    assert any(torch.equal(w, model.conv2.quantized_weight()) for w in unpacked)


def test_load_program_leaves_an_unquantized_program_as_loaded(tmp_path: Path) -> None:
    model = _with_statistics(_Residual()).eval()
    export_model(model, torch.zeros(1, 2, 5, 5), tmp_path)
    plain = torch.export.load(tmp_path / "model.pt2").module()
    loaded = load_program(tmp_path, device="cpu")
    assert [(n.op, str(n.target)) for n in loaded.graph.nodes] == [(n.op, str(n.target)) for n in plain.graph.nodes]
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), atol=0, rtol=0)


class _Noisy(nn.Module):
    """exp(scale) reads only a buffer; the noise is drawn from the generator in every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([0.5, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.exp() + torch.rand_like(self.scale)


def test_load_program_never_folds_a_random_draw(tmp_path: Path) -> None:
    torch.export.save(torch.export.export(_Noisy(), (torch.zeros(3, 2),)), tmp_path / "model.pt2")
    loaded = load_program(tmp_path)
    calls = _calls(loaded)
    assert "aten.exp.default" not in calls and any("rand" in target for target in calls)
    x = torch.zeros(3, 2)
    assert not torch.equal(loaded(x), loaded(x))  # new noise in every call
    torch.testing.assert_close(loaded(torch.ones(3, 2)) - loaded(x), torch.tensor([0.5, -1.0]).exp().expand(3, 2), atol=1.0, rtol=0)


class _Counter(nn.Module):
    """A buffer every call updates from its own value (``n <- 2n + 1``), as running statistics are."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        updated = self.n * 2 + 1
        self.n.copy_(updated)
        return x + updated


def test_load_program_never_folds_a_buffer_that_calls_change(tmp_path: Path) -> None:
    torch.export.save(torch.export.export(_Counter(), (torch.zeros(2),)), tmp_path / "model.pt2")
    loaded = load_program(tmp_path)
    assert [loaded(torch.zeros(2))[0].item() for _ in range(3)] == [1.0, 3.0, 7.0]


def test_model_pt_is_unpickled_only_as_slimtune_wrote_it(tmp_path: Path) -> None:
    """``model.pt`` is a whole-module pickle: loaded when its SHA-256 is the one the export recorded,
    refused (one line) when the file changed since or has no recorded checksum."""
    from deploy import CHECKSUMS, load_module
    from errors import UserError

    model = _Residual().eval()
    x = torch.randn(3, 2, 5, 5)
    export_model(model, x[:1], tmp_path)
    with torch.no_grad():
        assert torch.equal(load_module(tmp_path)(x), model(x))
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"model.pt: SHA-256 .* differs from the .* slimtune recorded in .*checksums.json") as info:
        load_module(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / CHECKSUMS).unlink()
    with pytest.raises(UserError, match=r"model.pt: no checksum in .*checksums.json, so slimtune cannot tell that it wrote this pickle"):
        load_module(tmp_path)


def test_deployed_latency_refuses_a_batch_its_form_refuses_instead_of_timing_another_form(tmp_path: Path) -> None:
    """A program exported at a fixed batch size is never swapped for the module (issue 30, item 4)."""
    from deploy import deployed_latency, storage_groups_quiet

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    export_model(model, torch.zeros(1, 1, 8, 8), tmp_path)
    # What trace_program falls back to for a model with data-dependent shapes: the example's batch only.
    with storage_groups_quiet():
        torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), tmp_path / "model.pt2")
    assert deployed_latency(tmp_path, torch.zeros(1, 1, 8, 8), repeats=1, threads=1)["latency_form"] == "program"
    with pytest.raises(UserError) as info:
        deployed_latency(tmp_path, torch.zeros(3, 1, 8, 8), repeats=1, threads=1)
    message = str(info.value)
    assert message.startswith("measure.latency_batch_size: the exported program (model.pt2) runs only at the batch size it was exported at")
    assert "not at 3" in message and "set measure.latency_batch_size: 1" in message and "\n" not in message


def test_a_smaller_bit_width_never_gives_a_larger_file() -> None:
    """Issue 26: the 3-bit program was larger than the 8-bit one (its unpacking graph outweighed its packed codes)."""
    import tempfile

    from search.trial.profile import profiled_model

    sizes = {}
    for bits in (8, 4, 3, 2):
        _, shape, model = profiled_model(
            "digits_cnn", None, {"task": {}, "model": {}, "method": {"bits": bits}}, {"digits": ((1, 8, 8), 10)}, method="minmax_quant"
        )
        with tempfile.TemporaryDirectory() as tmp:
            sizes[bits] = export_model(model, torch.zeros(1, *shape), Path(tmp), onnx=True)
    for name in ("model.pt2", "model.pt", "model.onnx"):
        assert [sizes[bits][name] for bits in (8, 4, 3, 2)] == sorted((sizes[bits][name] for bits in (8, 4, 3, 2)), reverse=True), (
            name,
            sizes,
        )
    assert sizes[2]["model.pt2"] < sizes[8]["model.pt2"]
