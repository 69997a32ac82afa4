"""L1-norm filter pruning: physical removal, monotone cost, the classifier kept, the right filters kept."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from torch import nn

from deploy import count_flops, count_params
from methods import create_method, get_method

# digits_cnn at 1x8x8, MACs by hand: conv 1->16 3x3 at 8x8, conv 16->32 at 8x8, max pool,
# conv 32->64 at 4x4, linear 64->10 (batch norm, ReLU and pooling count no MACs).
BASELINE_MACS = 16 * 1 * 9 * 64 + 32 * 16 * 9 * 64 + 64 * 32 * 9 * 16 + 64 * 10
HALF_MACS = 8 * 1 * 9 * 64 + 16 * 8 * 9 * 64 + 32 * 16 * 9 * 16 + 32 * 10


def _prepare(model: nn.Module, ctx, **params) -> nn.Module:
    return create_method("l1_filter", params).prepare(model, ctx)


def _cost(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    return count_flops(model, example).macs, count_params(model)


def test_prepare_removes_half_the_channels_physically(digits_context) -> None:
    model, ctx = digits_context()
    macs, params = _cost(model, ctx.example_input)
    assert macs == BASELINE_MACS == 599_680
    method = create_method("l1_filter", {"ratio": 0.5})
    model = method.prepare(model, ctx)
    conv1, conv2, conv3 = (model.features[i] for i in (0, 3, 7))
    assert (conv1.out_channels, conv2.in_channels, conv2.out_channels, conv3.in_channels, conv3.out_channels) == (8, 8, 16, 16, 32)
    assert [model.features[i].num_features for i in (1, 4, 8)] == [8, 16, 32]
    assert model.classifier.in_features == 32
    pruned_macs, pruned_params = _cost(model, ctx.example_input)
    assert pruned_macs == HALF_MACS == 152_384
    expected_params = 8 * 9 + 2 * 8 + 16 * 8 * 9 + 2 * 16 + 32 * 16 * 9 + 2 * 32 + 32 * 10 + 10
    assert pruned_params == expected_params
    assert method.metrics()["params_removed_fraction"] == pytest.approx(1 - expected_params / params)


def test_macs_and_params_fall_as_the_ratio_grows(digits_context) -> None:
    costs = []
    for ratio in (0.0, 0.2, 0.4, 0.6):
        model, ctx = digits_context()
        costs.append(_cost(_prepare(model, ctx, ratio=ratio), ctx.example_input))
    macs = [c[0] for c in costs]
    params = [c[1] for c in costs]
    assert macs[0] == BASELINE_MACS
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4, macs
    assert params == sorted(params, reverse=True) and len(set(params)) == 4, params


@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_classifier_keeps_every_class(digits_context, ratio: float) -> None:
    model, ctx = digits_context()
    model = _prepare(model, ctx, ratio=ratio)
    assert model.classifier.out_features == 10
    assert model.classifier.bias.shape == (10,)
    with torch.no_grad():
        assert model.eval()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_round_to_keeps_channel_counts_multiples(digits_context) -> None:
    model, ctx = digits_context()
    model = _prepare(model, ctx, ratio=0.3, round_to=8)
    counts = [model.features[i].out_channels for i in (0, 3, 7)]
    assert all(c % 8 == 0 for c in counts), counts
    # torch-pruning rounds the kept count down, so at least `ratio` is removed:
    # 16, 32, 64 less 30% is 11.2, 22.4, 44.8 -> 8, 16, 40.
    assert counts == [8, 16, 40]


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_kept_filters_are_those_with_the_largest_l1_norm(digits_context) -> None:
    _, ctx = digits_context()
    torch.manual_seed(0)
    model = TwoConv()
    with torch.no_grad():
        # Well separated norms in a scrambled order, so "keep the first half" would fail.
        scale = torch.tensor([0.3, 2.0, 0.1, 1.5, 3.0, 0.2, 1.0, 0.4]).view(8, 1, 1, 1)
        model.conv1.weight.copy_(model.conv1.weight.sign() * (model.conv1.weight.abs() + 0.05) * scale)
    original = model.conv1.weight.detach().clone()
    original_conv2 = model.conv2.weight.detach().clone()
    norms = original.abs().sum(dim=(1, 2, 3))
    kept = sorted(norms.topk(4).indices.tolist())
    assert kept == [1, 3, 4, 6]

    model = _prepare(model, ctx, ratio=0.5)

    assert model.conv1.weight.shape == (4, 1, 3, 3)
    assert torch.equal(model.conv1.weight, original[kept])
    # The next layer lost the matching input channels.
    assert model.conv2.weight.shape == (3, 4, 3, 3)
    assert any(torch.equal(model.conv2.weight[0], original_conv2[j][kept]) for j in range(6))
    assert model.fc.out_features == 10


def _effective(model: nn.Module, example: torch.Tensor, **params) -> dict:
    cls = get_method("l1_filter")
    return cls.effective_config(create_method("l1_filter", params).config, cls.model_facts(model, example))


def test_ratios_that_remove_the_same_channels_resolve_alike(digits_context) -> None:
    """The quickstart's trials 7 and 10 (issue #28): 0.133 and 0.129 keep 13, 27 and 55 of 16, 32 and 64 channels."""
    model, ctx = digits_context()
    assert _effective(model, ctx.example_input, ratio=0.133) == _effective(model, ctx.example_input, ratio=0.129)
    assert _effective(model, ctx.example_input, ratio=0.133)["kept"] == (13, 27, 55)
    # 0.141 keeps 54 of the 64 channels of the last convolution: one more removed, another model.
    assert _effective(model, ctx.example_input, ratio=0.141)["kept"] == (13, 27, 54)
    assert _effective(model, ctx.example_input, ratio=0.141) != _effective(model, ctx.example_input, ratio=0.133)
    # round_to changes how the channels are picked: kept apart even where it rounds nothing away.
    assert _effective(model, ctx.example_input, ratio=0.5, round_to=4) != _effective(model, ctx.example_input, ratio=0.5)


@pytest.mark.parametrize("context", ["digits_context", "cifar_context"])
def test_equal_effective_configs_build_equal_models(context: str, request) -> None:
    """Over a sweep of ratios (and round_to), configs that resolve alike prune to the same weights, and each kept count is real."""
    model, ctx = request.getfixturevalue(context)()
    cls = get_method("l1_filter")
    facts = cls.model_facts(model, ctx.example_input)
    built: dict[tuple, dict[str, torch.Tensor]] = {}
    for ratio in [0.1, 0.129, 0.133, 0.14, 0.141, 0.2, 0.25, 0.3, 0.31, 0.5, 0.52, 0.7]:
        for round_to in (1, 8):
            method = create_method("l1_filter", {"ratio": ratio, "round_to": round_to})
            key = tuple(sorted(cls.effective_config(method.config, facts).items()))
            state = method.prepare(copy.deepcopy(model), ctx).state_dict()
            if key in built:
                assert built[key].keys() == state.keys()
                assert all(torch.equal(built[key][k], state[k]) for k in state), (ratio, round_to)
            built[key] = state
    assert len(built) < 24  # some configs did resolve alike


def test_a_method_without_the_hook_keeps_its_values_as_they_are() -> None:
    kd = get_method("kd")
    config = create_method("kd", {"temperature": 2.5}).config
    assert kd.model_facts(nn.Linear(2, 2), torch.zeros(1, 2)) is None
    assert kd.effective_config(config, None) == asdict(config)
