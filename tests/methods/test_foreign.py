"""Every registered method on networks nobody here wrote (``tests/methods/foreign_models.py``).

Each method, at the most compressing end of its search ranges (what ``slimtune check``
pre-flights) with every phase one step long, either works end to end on each foreign model --
prepare, train, finalize, count, export and reload with equal outputs -- or is refused by
:class:`methods.NotApplicable` in one line that names the method. Methods made for another kind
of task (two-view distillation) are refused when a space pairs them with digits, before any
model is built. :data:`REFUSED` is the table of refusals: a method that starts or stops refusing
a model fails here until the table says so.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from deploy import check_round_trip, count_flops, count_params, export_model
from methods import NotApplicable, Pipeline, create_method, get_method, hyperparameters, list_methods
from models import create_model
from tasks import create_task
from tests.methods.conftest import frozen, make_context, trainable_copy
from tests.methods.foreign_models import FOREIGN_MODELS
from tests.methods.test_contract import aggressive

METHODS = list_methods()
CLASSIFIERS = [m for m in METHODS if get_method(m).task_kinds is None or "classification" in get_method(m).task_kinds]

#: (method, model) -> the words its refusal must hold (the layer or op it cannot handle).
REFUSED: dict[tuple[str, str], str] = {
    ("kse", "mobilenet_se"): "depthwise, 1x1 and patch convolutions",
    ("od", "mobilenet_se"): "no 3x3 Conv2d (groups=1)",
    ("wavelet", "mobilenet_se"): "no square linear map",
    ("decouple", "attention"): "coupled to a residual addition, attention",
    ("gal", "attention"): "coupled to a residual addition, a depthwise convolution, attention",
    ("kse", "attention"): "depthwise, 1x1 and patch convolutions",
    ("od", "attention"): "no 3x3 Conv2d (groups=1)",
    ("pams", "attention"): "TinyAttention has none",
    ("wavelet", "attention"): "no square linear map",
    ("decouple", "shared_weights"): "a layer called twice",
    ("gal", "shared_weights"): "a layer called twice",
    ("l1_filter", "shared_weights"): "'shared_conv', which runs 2 times per forward pass",
    ("ssr", "shared_weights"): "'shared_conv' runs 2 times per forward pass",
}


def one_step(name: str) -> dict:
    """``name`` at its aggressive end with every training budget at one epoch (of one batch)."""
    params = aggressive(name)
    for info in hyperparameters(get_method(name).Config):
        if info.budget and params.get(info.name, info.default) is not None:
            params[info.name] = 1
    return params


@pytest.fixture(scope="module")
def digits():
    task = create_task("digits")
    batches = list(DataLoader(Subset(task.train_set, range(16)), batch_size=16))
    return task, batches


@pytest.fixture(scope="module")
def foreign(digits):
    """``make(model_name) -> (model, ctx)``: a trainable copy of the randomly initialised foreign model, one digits batch."""
    task, batches = digits
    teachers = {}

    def make(model_name: str):
        if model_name not in teachers:
            torch.manual_seed(0)
            teachers[model_name] = frozen(FOREIGN_MODELS[model_name]())
        teacher = teachers[model_name]
        return trainable_copy(teacher), make_context(teacher, batches, batches, task, task.example_input(1))

    return make


CASES = [(m, model) for m in CLASSIFIERS for model in FOREIGN_MODELS]


@pytest.mark.parametrize(("name", "model_name"), CASES, ids=[f"{m}-{model}" for m, model in CASES])
def test_method_works_on_foreign_model_or_refuses_in_one_line(foreign, tmp_path, name: str, model_name: str) -> None:
    model, ctx = foreign(model_name)
    before = count_params(model)
    torch.manual_seed(0)
    pipeline = Pipeline([create_method(name, one_step(name))])
    try:
        out = pipeline.run(model, ctx).eval()
    except NotApplicable as refusal:
        reason = str(refusal)
        assert (name, model_name) in REFUSED, f"{name} refuses {model_name}: {reason}"
        assert "\n" not in reason and reason.startswith(f"{name} "), reason
        assert REFUSED[name, model_name] in reason
        return
    assert (name, model_name) not in REFUSED, f"{name} now works on {model_name}; take it out of REFUSED"
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = out(x)
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    assert count_flops(out, ctx.example_input).macs > 0
    assert all(type(v) is float and math.isfinite(v) for v in pipeline.metrics().values())
    if name in ("l1_filter", "kse", "od"):  # one-shot: what prepare decides is removed whatever the training
        assert count_params(out) < before, f"{name} is one-shot but removed nothing from {model_name}"
    export_model(out, ctx.example_input, tmp_path, {"recipe": pipeline.recipe()})
    check_round_trip(tmp_path, x, rtol=1e-5)  # raises when the reloaded program's outputs differ


@pytest.mark.parametrize(("name", "model_name"), CASES, ids=[f"{m}-{model}" for m, model in CASES])
def test_touches_refuses_where_the_run_does_and_names_the_layers_it_changes(foreign, name: str, model_name: str) -> None:
    """What ``slimtune check`` shows: the same refusal without training, or the layers changed and those left alone, each with a reason."""
    model, ctx = foreign(model_name)
    method = create_method(name, one_step(name))
    if (name, model_name) in REFUSED:
        with pytest.raises(NotApplicable, match=re.escape(REFUSED[name, model_name])):
            method.touches(model, ctx)
        return
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    touched = method.touches(model, ctx)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes  # the model is left as it was
    modules = dict(model.named_modules())
    left = [layer for layer, _ in touched.left_alone]
    assert set(touched.changed) <= set(modules) and set(left) <= set(modules)
    assert not set(touched.changed) & set(left) and all(why for _, why in touched.left_alone)
    assert bool(touched.changed) == get_method(name).changes_architecture, touched


TWO_VIEW_ONLY = [m for m in METHODS if m not in CLASSIFIERS]


@pytest.mark.parametrize("name", TWO_VIEW_ONLY)
def test_two_view_method_on_a_foreign_classifier_is_refused_in_one_line(foreign, name: str) -> None:
    """A space never gets here (the task kind is refused when loaded); a direct call is refused cleanly."""
    assert get_method(name).task_kinds == ("two_view",)
    model, ctx = foreign("mobilenet_se")
    with pytest.raises(NotApplicable) as refused:
        create_method(name).prepare(model, ctx)
    assert str(refused.value).startswith(f"{name} ") and "\n" not in str(refused.value)


def test_l1_filter_leaves_attention_alone_and_prunes_the_mlp(foreign) -> None:
    model, ctx = foreign("attention")
    touched = create_method("l1_filter").touches(model, ctx)
    assert touched.changed == ("mlp.0",)
    left = dict(touched.left_alone)
    assert set(left) == {"attention", "attention.out_proj", "patch", "mlp.2", "head"}
    assert "multi-head attention" in left["attention"] and "coupled to 'attention'" in left["patch"]
    assert left["head"] == "the classifier: its outputs are the classes"
    out = create_method("l1_filter", {"ratio": 0.5}).prepare(model, ctx)
    assert (out.mlp[0].out_features, out.mlp[2].in_features, out.attention.embed_dim) == (16, 16, 16)


def test_l1_filter_prunes_through_concat_and_interpolate(foreign) -> None:
    model, ctx = foreign("concat_branches")
    touched = create_method("l1_filter").touches(model, ctx)
    assert set(touched.changed) == {"stem", "fine", "coarse", "merge", "mix"}
    out = create_method("l1_filter", {"ratio": 0.5}).prepare(model, ctx)
    assert (out.fine.out_channels, out.coarse.out_channels, out.merge.in_channels, out.mix.out_features) == (4, 4, 8, 8)


def test_default_touches_lists_the_layers_prepare_swaps(foreign) -> None:
    model, ctx = foreign("shared_weights")
    touched = create_method("minmax_quant").touches(model, ctx)
    assert touched.changed == ("shared_conv", "shared_fc")  # not the first layer, not the classifier
    assert [name for name, _ in touched.left_alone] == ["stem", "head"]
    assert type(model.shared_conv).__name__ == "Conv2d"  # the model itself is left as it was


class PositionTable(nn.Module):
    """A learnt ``(channels, length)`` table added to a ``(batch, channels, length)`` activation: its channel
    axis is its first, not its last (torch-pruning's guess for a parameter outside its layers)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, channels, 2, stride=2)  # (batch, channels, 4, 4)
        self.table = nn.Parameter(torch.randn(channels, 16))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = F.relu(self.patch(x).flatten(2) + self.table)  # (batch, channels, 16)
        return self.head(tokens.mean(dim=2))


def test_l1_filter_prunes_a_loose_parameter_along_its_channel_axis(digits, tmp_path) -> None:
    task, batches = digits
    torch.manual_seed(0)
    teacher = frozen(PositionTable(6))
    model, ctx = trainable_copy(teacher), make_context(teacher, batches, batches, task, task.example_input(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch-pruning is told the table's axis: it has nothing to warn about
        assert create_method("l1_filter").touches(model, ctx).changed == ("patch",)
        out = create_method("l1_filter", {"ratio": 0.5}).prepare(model, ctx).eval()
    assert (out.patch.out_channels, tuple(out.table.shape), out.head.in_features) == (3, (3, 16), 3)
    kept = [next(i for i in range(6) if torch.equal(w, teacher.patch.weight[i])) for w in out.patch.weight]
    assert torch.equal(out.table, teacher.table[kept])  # each kept channel's own row
    masked = copy.deepcopy(teacher)
    with torch.no_grad():
        for i in set(range(6)) - set(kept):
            masked.patch.weight[i] = 0.0
            masked.patch.bias[i] = 0.0
            masked.table[i] = -1.0  # its channel reads 0 after the ReLU
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (out(x) - masked(x)).abs().max().item() <= 1e-5
    export_model(out, ctx.example_input, tmp_path, {"recipe": []})
    check_round_trip(tmp_path, x, rtol=1e-5)


def test_l1_filter_leaves_alone_what_a_loose_parameter_of_unknown_axis_is_tied_to(digits) -> None:
    task, batches = digits
    torch.manual_seed(0)
    teacher = frozen(PositionTable(16))  # a (16, 16) table: either axis could hold the 16 channels
    model, ctx = trainable_copy(teacher), make_context(teacher, batches, batches, task, task.example_input(1))
    with pytest.raises(NotApplicable) as refused:
        create_method("l1_filter").touches(model, ctx)
    assert (
        "'patch' is left alone (its channels are coupled to the parameter 'table' (16, 16), whose channel axis cannot be "
        "told: 2 of its axes have the width of the layers tied to it, 16)"
    ) in str(refused.value)


# --- registered models that crashed before (a plain exception instead of a refusal) ------------


def registered(model_name: str, task_name: str):
    task = create_task(task_name)
    torch.manual_seed(0)
    teacher = frozen(create_model(model_name, **task.model_kwargs()))
    batch = [(task.example_input(2), torch.zeros(2, dtype=torch.long))]
    return trainable_copy(teacher), make_context(teacher, batch, batch, task, task.example_input(1))


REGISTERED_REFUSALS = [
    ("l1_filter", "gru", "seq_digits", "times per forward pass (shared weights or a recurrent step)"),
    ("l1_filter", "two_branch_digits", "digits_2view", "one forward pass does not reach 'specific.0.encoder.1'"),
    ("gal", "gru", "seq_digits", "found no Conv2d of SequenceModel"),
    ("od", "gru", "seq_digits", "no 3x3 Conv2d (groups=1)"),
    ("pams", "gru", "seq_digits", "the model has none"),
    ("kd", "two_branch_digits", "digits_2view", "outputs (2, 4, 10) in training"),
]


@pytest.mark.parametrize(
    ("name", "model_name", "task_name", "words"), REGISTERED_REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REGISTERED_REFUSALS]
)
def test_method_refuses_a_registered_model_it_cannot_compress(name: str, model_name: str, task_name: str, words: str) -> None:
    model, ctx = registered(model_name, task_name)
    with pytest.raises(NotApplicable) as refused:
        create_method(name).prepare(model, ctx)
    reason = str(refused.value)
    assert reason.startswith(f"{name} ") and "\n" not in reason and words in reason, reason


def test_gal_does_not_mask_channels_a_loose_parameter_is_added_to(digits) -> None:
    """A masked channel would still carry the table's entry, so removing it would change the outputs."""
    task, batches = digits
    torch.manual_seed(0)
    teacher = frozen(PositionTable(6))
    model, ctx = trainable_copy(teacher), make_context(teacher, batches, batches, task, task.example_input(1))
    with pytest.raises(NotApplicable, match="gal found no Conv2d of PositionTable"):
        create_method("gal", {"structure": "channel"}).touches(model, ctx)
