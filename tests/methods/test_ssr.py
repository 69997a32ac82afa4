"""SSR: the proximal steps by hand, groups from the dependency graph, the paper's properties (zero
groups grow with lambda, ||W - F|| falls, L2,0 shrinks survivors less than L2,1), removal equal to
the masked model, exact resume inside AULM, the layerwise schedule, and composition."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from deploy import count_flops, count_params, size_bytes
from methods import MethodContext, Phase, Pipeline, TrainingState, create_method, train_phase
from methods.ssr import apply_mask, find_layers, group_norms, group_prox
from models import create_model

from .conftest import TINY_BATCH, frozen, make_context, trainable_copy

# --- deciding: the proximal steps and the groups ------------------------------------------------


def test_group_prox_soft_and_hard_thresholds_by_hand() -> None:
    # Three groups spread over two tensors: group norms 5, 1 and 0.5.
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.3, 0.0]])
    b = torch.tensor([4.0, 0.0, 0.4])
    groups = [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])]
    torch.testing.assert_close(group_norms([a, b], groups, 3), torch.tensor([5.0, 1.0, 0.5]))
    # L2,1 with lam/rho = 2 / 2 = 1: norms shrink by 1, groups at or under 1 vanish.
    (fa, fb), zero = group_prox([a, b], groups, 3, "l21", lam=2.0, rho=2.0)
    torch.testing.assert_close(fa, torch.tensor([[2.4, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(fb, torch.tensor([3.2, 0.0, 0.0]))
    assert zero.tolist() == [False, True, True]
    # L2,0 with 2 lam/rho = 0.5: groups with squared norm over 0.5 are kept whole (1 and 25), 0.25 goes.
    (fa, fb), zero = group_prox([a, b], groups, 3, "l20", lam=0.5, rho=2.0)
    torch.testing.assert_close(fa, torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(fb, torch.tensor([4.0, 0.0, 0.0]))
    assert zero.tolist() == [False, False, True]


GROUPS = [
    # model, input, layers (first module, groups), groups in all
    ("digits_lenet", (1, 8, 8), [("features.0", 16), ("features.3", 32), ("fc1", 64)], 112),
    ("digits_cnn", (1, 8, 8), [("features.0", 16), ("features.3", 32), ("features.7", 64)], 112),
    # The stem and every block's output are one residual stream: one layer, as torch-pruning couples them.
    ("digits_resnet", (1, 8, 8), [("conv1", 16), ("layer1.0.conv1", 16), ("layer2.0.conv1", 32), ("layer3.0.conv1", 64)], 128),
]


@pytest.mark.parametrize(("model_name", "shape", "layers", "total"), GROUPS, ids=[g[0] for g in GROUPS])
def test_groups_follow_the_dependency_graph(model_name, shape, layers, total) -> None:
    model = create_model(model_name, num_classes=10, in_channels=shape[0])
    found = find_layers(model, torch.zeros(1, *shape))
    assert [(layer.name, layer.groups) for layer in found] == layers
    assert sum(layer.groups for layer in found) == total
    for p in model.parameters():  # a frozen model (torch-pruning traces autograd) gives the same groups
        p.requires_grad_(False)
    assert [(layer.name, layer.groups) for layer in find_layers(model, torch.zeros(1, *shape))] == layers
    assert not any(p.requires_grad for p in model.parameters())
    params = [p for layer in found for p in layer.params]
    assert not any(p.startswith(("fc2", "classifier", "fc.")) for p in params)  # the classifier keeps its outputs
    if model_name == "digits_cnn":
        assert found[0].params == ["features.0.weight", "features.1.weight", "features.1.bias"]  # conv + its batch norm
    if model_name == "digits_resnet":
        stream = set(found[0].params)
        assert {"conv1.weight", "bn1.bias", "layer1.0.conv2.weight", "layer2.0.bn2.weight", "layer3.0.conv2.weight"} <= stream


# --- a trained LeNet on digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_baseline(digits_task) -> nn.Module:
    """``digits_lenet`` trained for 10 epochs on the digits train split; frozen."""
    torch.manual_seed(0)
    model = create_model("digits_lenet", num_classes=10, in_channels=1)
    loader = DataLoader(digits_task.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = list(DataLoader(digits_task.val_set, batch_size=256))
    ctx = make_context(model, loader, val, digits_task, digits_task.example_input(1), lr=0.05)
    train_phase(model, Phase("baseline", 10), ctx, loss_terms=[])
    assert digits_task.evaluate(model, val, "cpu")["accuracy"] > 0.9
    return frozen(model)


@pytest.fixture
def lenet(digits_task, lenet_baseline):
    """``make(epochs=1, examples=512) -> (model, ctx)``: a trainable copy and a shuffling loader (seed 0)."""
    val = list(DataLoader(digits_task.val_set, batch_size=256))

    def make(epochs: int = 1, examples: int = 512) -> tuple[nn.Module, MethodContext]:
        subset = Subset(digits_task.train_set, range(examples))
        loader = DataLoader(subset, batch_size=TINY_BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
        ctx = make_context(lenet_baseline, loader, val, digits_task, digits_task.example_input(1), epochs, lr=0.01)
        return trainable_copy(lenet_baseline), ctx

    return make


def _aulm(method, model: nn.Module, ctx: MethodContext) -> nn.Module:
    """Prepare and train the before-finalize phases, as the pipeline does."""
    model = method.prepare(model, ctx)
    for phase in method.phases(ctx):
        if not phase.after_finalize:
            train_phase(model, phase, ctx, loss_terms=[])
    return model


def _zero_groups(method) -> int:
    return sum(int(layer.zero.sum()) for layer in method.layers)


# --- the paper's properties ---------------------------------------------------------------------


# 512 examples in batches of 32: 16 W-steps an epoch; K = 20 lets each W-step stretch settle
# before the multipliers move (a few steps between updates make AULM oscillate).
AULM = {"update_period": 20, "aulm_epochs": 10}


@pytest.mark.parametrize(("variant", "lams"), [("l21", (0.1, 0.15, 0.2, 0.3)), ("l20", (0.2, 0.3, 0.4, 0.6))])
def test_zero_groups_grow_with_lambda(lenet, variant: str, lams: tuple[float, ...]) -> None:
    counts, macs = [], []
    for lam in lams:
        model, ctx = lenet()
        torch.manual_seed(0)
        pipeline = Pipeline([create_method("ssr", {"lam": lam, "variant": variant, **AULM, "finetune_epochs": 0})])
        final = pipeline.run(model, ctx)
        counts.append(pipeline.metrics()["ssr.zero_groups"])
        macs.append(count_flops(final, ctx.example_input).macs)
    assert counts == sorted(counts) and counts[0] < counts[1] < counts[2] < counts[3], counts
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0] / 2, macs


@pytest.mark.parametrize(("variant", "lam"), [("l21", 0.1), ("l20", 0.4)])
def test_w_minus_f_falls_during_aulm(lenet, variant: str, lam: float) -> None:
    model, ctx = lenet()
    method = create_method("ssr", {"lam": lam, "variant": variant, **AULM})
    torch.manual_seed(0)
    _aulm(method, model, ctx)
    gaps = method.gaps  # ||W - F|| / ||W|| at each F-step
    assert len(gaps) == 10 * 16 // 20
    assert gaps[0] > 0.05  # the first F-step shrinks or zeroes groups that W still holds whole
    assert gaps[-1] < gaps[0] / 4, gaps  # W has moved to F: it is (nearly) structurally sparse


def _survivor_shrinkage(variant: str, lam: float, lenet) -> tuple[int, float]:
    """(zero groups, mean over surviving groups of ||W_i|| after AULM / ||W_i|| before)."""
    model, ctx = lenet()
    method = create_method("ssr", {"lam": lam, "variant": variant, **AULM})
    model = method.prepare(model, ctx)
    before = [group_norms([w.detach().clone() for w in layer.weights(model)], layer.group_of_row, layer.groups) for layer in method.layers]
    torch.manual_seed(0)
    for phase in method.phases(ctx):
        if not phase.after_finalize:
            train_phase(model, phase, ctx, loss_terms=[])
    ratios = []
    for layer, norms in zip(method.layers, before):
        after = group_norms([w.detach() for w in layer.weights(model)], layer.group_of_row, layer.groups)
        ratios.append((after / norms)[~layer.zero])
    return _zero_groups(method), float(torch.cat(ratios).mean())


def test_l20_shrinks_the_surviving_filters_less_than_l21_at_the_same_sparsity(lenet) -> None:
    zeros_l21, kept_l21 = _survivor_shrinkage("l21", 0.2, lenet)
    # Bisect L2,0's lambda until it zeroes as many groups.
    low, high = 0.1, 0.6
    for _ in range(8):
        lam = (low * high) ** 0.5
        zeros_l20, kept_l20 = _survivor_shrinkage("l20", lam, lenet)
        if abs(zeros_l20 - zeros_l21) <= 2:
            break
        low, high = (lam, high) if zeros_l20 < zeros_l21 else (low, lam)
    assert zeros_l21 > 10 and abs(zeros_l20 - zeros_l21) <= 2, (zeros_l21, zeros_l20)
    assert kept_l20 > kept_l21 + 0.05, (kept_l20, kept_l21)


@pytest.mark.parametrize("variant", ["l21", "l20"])
def test_one_lambda_prunes_the_same_share_of_layers_differing_only_in_weight_scale(variant: str) -> None:
    # Two layers whose group norms are the same numbers, the second's times 10: each layer's
    # lam_l (lam s_l for L2,1, lam s_l^2 for L2,0, s_l the mean group norm) makes the first
    # F-step's cut relative to the layer's scale, so both lose the same groups.
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    norms = torch.linspace(0.1, 1.0, 8)
    with torch.no_grad():
        for conv, scale in ((model[0], 1.0), (model[2], 10.0)):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, 0, 0, 0] = scale * norms
    ctx = MethodContext(
        teacher=model, train_loader=[], val_loader=[], task_loss=F.cross_entropy, evaluate=lambda model: {},
        example_input=torch.zeros(1, 1, 8, 8), device=torch.device("cpu"), log=lambda message: None,
    )  # fmt: skip
    method = create_method("ssr", {"variant": variant, "lam": 0.3, "rho": 1.0})
    model = method.prepare(model, ctx)
    assert [layer.name for layer in method.layers] == ["0", "2"]
    method.start_aulm(model, [0, 1])
    method.update_f_and_y(model)
    first, second = (layer.zero.tolist() for layer in method.layers)
    assert 0 < sum(first) < 8 and first == second, (first, second)


# --- doing: removal -------------------------------------------------------------------------------


def _random_context(model_name: str, shape: tuple[int, ...]) -> tuple[nn.Module, MethodContext]:
    """A random teacher whose batch norms know the random data, and non-zero batch-norm shifts."""
    torch.manual_seed(0)
    teacher = create_model(model_name, num_classes=10, in_channels=shape[0])
    data = [(torch.randn(4, *shape, generator=torch.Generator().manual_seed(i)), torch.zeros(4, dtype=torch.long)) for i in range(2)]
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
            nn.init.normal_(module.bias, std=0.5)  # a zero filter alone would leave this shift
    with torch.no_grad():
        for inputs, _ in data:
            teacher.train()(inputs)
    teacher = frozen(teacher)
    ctx = MethodContext(
        teacher=teacher, train_loader=data, val_loader=data[:1], task_loss=F.cross_entropy, evaluate=lambda model: {},
        example_input=torch.zeros(1, *shape), device=torch.device("cpu"), log=lambda message: None,
    )  # fmt: skip
    return trainable_copy(teacher), ctx


REMOVAL = [("digits_lenet", (1, 8, 8)), ("digits_resnet", (1, 8, 8)), ("resnet20", (3, 32, 32)), ("vgg16", (3, 32, 32))]


@pytest.mark.parametrize(("model_name", "shape"), REMOVAL, ids=[r[0] for r in REMOVAL])
def test_removal_gives_the_masked_models_outputs(model_name, shape) -> None:
    model, ctx = _random_context(model_name, shape)
    method = create_method("ssr")
    model = method.prepare(model, ctx)
    generator = torch.Generator().manual_seed(3)
    for layer in method.layers:  # every group of a layer zero in one layer: a module keeps one channel
        layer.zero = (
            torch.ones(layer.groups, dtype=torch.bool)
            if layer is method.layers[-1]
            else torch.rand(layer.groups, generator=generator) < 0.5
        )
        apply_mask(model, layer)
    zero = _zero_groups(method)
    masked = copy.deepcopy(model).eval()
    final = method.finalize(model, ctx).eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, got = masked(x), final(x)
    assert (got - reference).abs().max().item() <= 1e-5 * max(1.0, reference.abs().max().item())
    assert (
        count_params(final) < count_params(ctx.teacher)
        and count_flops(final, ctx.example_input).macs < count_flops(ctx.teacher, ctx.example_input).macs
    )
    metrics = method.metrics()
    assert metrics["zero_groups"] == zero and 0 < metrics["groups_removed"] < zero
    assert metrics["removal_error"] <= 1e-5 * max(1.0, reference.abs().max().item())
    # Nothing auxiliary is left: the model holds exactly its own modules' parameters.
    assert {n for n, _ in final.named_parameters()} == {n for n, _ in ctx.teacher.named_parameters()}
    assert method.state_dict()["layers"] == []


# --- training: schedules, resume, composition ---------------------------------------------------


def test_layerwise_trains_one_layer_at_a_time_with_earlier_masks_fixed(lenet) -> None:
    model, ctx = lenet(examples=128)
    method = create_method(
        "ssr", {"lam": 0.4, "variant": "l20", "schedule": "layerwise", "update_period": 8, "aulm_epochs": 2, "layer_finetune_epochs": 1}
    )
    model = method.prepare(model, ctx)
    phases = method.phases(ctx)
    assert [(p.name, p.after_finalize) for p in phases] == [
        ("aulm[features.0]", False), ("finetune[features.0]", False), ("aulm[features.3]", False),
        ("finetune[features.3]", False), ("aulm[fc1]", False), ("finetune[fc1]", False), ("finetune", True),
    ]  # fmt: skip
    torch.manual_seed(0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_phase(model, phases[0], ctx, loss_terms=[])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == {"features.0.weight", "features.0.bias"}
    first = method.layers[0]
    assert first.zero.any()
    for phase in phases[1:6]:
        train_phase(model, phase, ctx, loss_terms=[])
    weight = model.get_parameter("features.0.weight")
    assert (weight[first.zero].abs().sum() == 0) and (weight[~first.zero].abs().sum() > 0)  # fixed through 2 fine-tunes
    assert all(layer.zero is not None for layer in method.layers)


def _saved(state: TrainingState) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("schedule", ["global", "layerwise"])
def test_resume_inside_aulm_gives_the_same_model(lenet, schedule: str) -> None:
    # 3 steps an epoch and K = 4: F- and Y-steps at iterations 3 and 7, then at the phase's end.
    params = {
        "lam": 0.4,
        "variant": "l20",
        "update_period": 4,
        "aulm_epochs": 3,
        "finetune_epochs": 1,
        "schedule": schedule,
        "layer_finetune_epochs": 1,
    }
    recipe = [{"name": "ssr", "params": params}]

    def run(resume=None):
        model, ctx = lenet(examples=96)
        states = []
        torch.manual_seed(0)
        pipeline = Pipeline.from_recipe(recipe)
        final = pipeline.run(model, ctx, on_epoch_end=lambda s, m: states.append(_saved(s)), resume=resume)
        with torch.no_grad():
            return final.eval()(ctx.val_loader[0][0]), states, pipeline.metrics()

    outputs, states, metrics = run()
    assert metrics["ssr.groups_removed"] > 0
    for after in (1, 2):  # inside the (first) AULM phase: F, Y and the step counter travel with the method
        state = torch.load(io.BytesIO(states[after - 1]), weights_only=False)
        assert state.method_states[0]["layers"][0]["f"] is not None
        resumed, _, resumed_metrics = run(state)
        assert torch.equal(resumed, outputs), f"resumed after epoch {after}"
        assert resumed_metrics == metrics


def test_composes_as_ssr_kd_minmax_quant_and_ssr_pams(lenet) -> None:
    for names in (["ssr", "kd", "minmax_quant"], ["ssr", "pams"]):
        model, ctx = lenet(examples=128)
        torch.manual_seed(0)
        params = {"ssr": {"lam": 0.4, "variant": "l20", "update_period": 8, "aulm_epochs": 2, "finetune_epochs": 1}}
        pipeline = Pipeline([create_method(n, params.get(n, {})) for n in names])
        final = pipeline.run(model, ctx).eval()
        metrics = pipeline.metrics()
        assert metrics["ssr.groups_removed"] > 0 and metrics["ssr.removal_error"] <= 1e-5
        assert count_flops(final, ctx.example_input).macs < count_flops(ctx.teacher, ctx.example_input).macs
        assert size_bytes(final) < size_bytes(ctx.teacher) / 2  # pruned, then packed to fewer bits
        x = ctx.val_loader[0][0]
        with torch.no_grad():
            accuracy = float((final(x).argmax(1) == ctx.val_loader[0][1]).float().mean())
        assert accuracy > 0.5, (names, accuracy)


def test_kd_shapes_the_aulm_phase(lenet) -> None:
    """kd's term reaches ssr's phases: with it the AULM loss is larger by the KL term from the first step."""
    losses = {}
    for names in (["ssr"], ["ssr", "kd"]):
        model, ctx = lenet(examples=32)
        history = []
        torch.manual_seed(0)
        Pipeline([create_method(n, {"aulm_epochs": 1, "finetune_epochs": 0} if n == "ssr" else {"weight": 5.0}) for n in names]).run(
            model, ctx, on_epoch_end=lambda s, m: history.append(m["train_loss"])
        )
        losses[len(names)] = history[0]
    assert losses[2] > losses[1]


def test_config_errors_name_the_rule() -> None:
    with pytest.raises(ValueError, match=r"`lam >= 0` must hold, but got lam=-0.1"):
        create_method("ssr", {"lam": -0.1})
    with pytest.raises(ValueError, match=r"`update_period >= 1` must hold, but got update_period=0"):
        create_method("ssr", {"update_period": 0})
    with pytest.raises(ValueError, match=r"`variant` must be one of l21, l20, but got 'l1'"):
        create_method("ssr", {"variant": "l1"})
