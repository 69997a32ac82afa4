"""Model zoo: registry behaviour and the reference sizes of each architecture."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from deploy import count_flops, count_params
from errors import UserError
from models import BasicBlock, create_model, list_models, register_model


def _macs_params(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    return count_flops(model, torch.randn(shape)).macs, count_params(model)


def test_list_models_is_sorted_and_has_only_registered_names() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"digits_cnn", "digits_resnet", "resnet20", "resnet56", "vgg16"} <= set(names)
    assert "resnet50" not in names  # torchvision models are accepted but not listed


def test_resnet56_matches_he_et_al() -> None:
    macs, params = _macs_params(create_model("resnet56", 10), (1, 3, 32, 32))
    assert params == 853_018  # option-A shortcuts: no shortcut parameters
    assert macs == pytest.approx(125.49e6, rel=0.005)
    assert params == pytest.approx(0.85e6, rel=0.005)


def test_resnet20_matches_he_et_al() -> None:
    macs, params = _macs_params(create_model("resnet20", 10), (1, 3, 32, 32))
    assert params == 269_722
    assert macs == 40_551_040
    assert macs == pytest.approx(40.55e6, rel=0.01)
    assert params == pytest.approx(0.27e6, rel=0.01)


def test_option_b_shortcut_adds_two_projections() -> None:
    macs, params = _macs_params(create_model("resnet56", 10, shortcut="B"), (1, 3, 32, 32))
    # 1x1 conv + BN at 16->32 and 32->64: 512 + 64 + 2048 + 128 parameters.
    assert params == 853_018 + 2_752
    assert macs == 125_485_696 + 2 * 131_072


def test_vgg16_cifar_size() -> None:
    macs, params = _macs_params(create_model("vgg16", 10), (1, 3, 32, 32))
    assert params == 14_724_042
    assert macs == 313_201_664


def test_torchvision_resnet50() -> None:
    model = create_model("resnet50", 1000)
    macs, params = _macs_params(model, (1, 3, 224, 224))
    assert params == 25_557_032
    assert macs == pytest.approx(4.09e9, rel=0.01)


def test_torchvision_prefix_bypasses_registered_name() -> None:
    cifar = create_model("vgg16", 10)
    imagenet = create_model("torchvision:vgg16", 10)
    assert count_params(imagenet) > 5 * count_params(cifar)  # the 4096-wide classifier


def test_torchvision_first_conv_follows_in_channels() -> None:
    model = create_model("torchvision:resnet18", 7, in_channels=1)
    assert model.conv1.in_channels == 1
    out = model.eval()(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 7)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet"])
def test_digits_models_give_ten_logits(name: str) -> None:
    model = create_model(name, 10, in_channels=1).eval()
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UserError, match="resnet56"):
        create_model("resnet5", 10)


def test_unknown_model_lists_each_name_once_and_says_which_vgg16_is_imagenet() -> None:
    with pytest.raises(UserError) as error:
        create_model("vgg61", 10)
    message = str(error.value)
    names = [n.strip() for part in message.split("models: ")[1:] for n in part.split(".")[0].split(",")]
    assert len(names) == len(set(names)) and len(names) > 80
    assert names.count("vgg16") == 1 and names.count("torchvision:vgg16") == 1
    assert "torchvision:vgg16 is torchvision's ImageNet model" in message and "\n" not in message


def test_unknown_option_is_a_user_error() -> None:
    with pytest.raises(UserError, match="shortcut"):
        create_model("resnet20", 10, shortcutt="A")
    with pytest.raises(UserError, match="Known shortcuts: A, B"):
        create_model("resnet20", 10, shortcut="a")


def test_register_model_rejects_a_second_factory_under_one_name() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_model("resnet20")(lambda num_classes, in_channels: nn.Linear(1, num_classes))


def test_basic_block_exposes_residual_branch() -> None:
    block = create_model("resnet20", 10).layer2[0]
    assert isinstance(block, BasicBlock)
    x = torch.randn(1, 16, 8, 8)
    block.eval()
    expected = torch.relu(block.residual(x) + block.shortcut(x))
    torch.testing.assert_close(block(x), expected)
    assert [n for n, _ in block.named_children()] == ["conv1", "bn1", "conv2", "bn2", "shortcut"]


def test_torch_pruning_prunes_through_option_a_shortcuts_exactly() -> None:
    torch.manual_seed(0)
    model = create_model("digits_resnet", 10, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    # Removing stem channel 3 reaches every stage: the zero-padded shortcut ties it to
    # channel 16 + 3 of stage 2 and to channels 3, 19, 35 and 51 of stage 3.
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[3])

    # Reference: silence those channels at every BN that produces them; the pruned network
    # must then compute exactly what this one computes.
    reference = copy.deepcopy(model)
    names = {module: name for name, module in model.named_modules()}
    silenced = 0
    for dep, idxs in group:
        if isinstance(dep.target.module, nn.BatchNorm2d):
            bn = reference.get_submodule(names[dep.target.module])
            bn.weight.data[idxs] = 0
            bn.bias.data[idxs] = 0
            silenced += len(idxs)
    assert silenced == 1 + 1 + 2 + 4  # stem, stage 1, stage 2, stage 3
    group.prune()

    assert model.layer3[0].conv2.out_channels == 60
    assert model.layer2[0].conv2.out_channels == 30
    torch.testing.assert_close(model(x), reference(x))
