"""The two-branch models: heads in training, the shared path in evaluation, modality routing, the bottleneck's cost."""

from __future__ import annotations

import pytest
import torch

from deploy import count_flops, count_params
from errors import UserError
from models import create_model
from tasks.two_view import with_modality


def tagged(batch: int, modality: int, channels: int = 1, size: tuple[int, int] = (8, 8), seed: int = 0) -> torch.Tensor:
    images = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))
    return with_modality(images, modality)


def test_training_outputs_every_head_and_evaluation_the_shared_representation_logits() -> None:
    torch.manual_seed(0)
    model = create_model("two_branch_digits", num_classes=10, in_channels=1)
    x = tagged(4, 0)
    heads = model.train()(x)
    assert heads.shape == (4, 4, 10)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), heads[:, 3].detach())  # the shared representation's head
        assert model.embed(x).shape == (4, 16)


def test_each_example_goes_through_its_own_modality_branch() -> None:
    torch.manual_seed(0)
    model = create_model("two_branch_digits", num_classes=10, in_channels=1).train()
    mixed = torch.cat([tagged(2, 0), tagged(3, 1, seed=1)])
    heads = model.heads(mixed)
    image = mixed[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(heads[:2, 0], model.specific[0](image[:2])[0])
        torch.testing.assert_close(heads[2:, 0], model.specific[1](image[2:])[0])
        torch.testing.assert_close(heads[:, 2], model.shared(image)[0])


def test_a_narrower_bottleneck_has_fewer_params_and_macs() -> None:
    example = tagged(1, 0)
    wide = create_model("two_branch_digits", num_classes=10, in_channels=1, bottleneck=32).eval()
    narrow = create_model("two_branch_digits", num_classes=10, in_channels=1, bottleneck=4).eval()
    # Each branch: bottleneck MLP 64 -> 32 -> b plus the classifier b -> 10.
    assert count_params(wide) - count_params(narrow) == 3 * ((32 + 1) * (32 - 4) + 10 * (32 - 4))
    assert count_flops(wide, example).macs - count_flops(narrow, example).macs == 32 * 28 + 28 * 10


def test_resnet_backbone_option() -> None:
    torch.manual_seed(0)
    model = create_model("two_branch_resnet", num_classes=5, in_channels=3, bottleneck=8)
    x = torch.cat([tagged(2, 0, channels=3, size=(32, 16)), tagged(2, 1, channels=3, size=(32, 16))])
    assert model.train()(x).shape == (4, 4, 5)
    assert model.eval().embed(x).shape == (4, 8)
    with pytest.raises(UserError, match="takes a torchvision ResNet as backbone"):
        create_model("two_branch_resnet", num_classes=5, backbone="vgg11")


def test_wrong_input_says_what_the_model_reads() -> None:
    model = create_model("two_branch_digits", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"reads 1 image planes plus a modality plane, shape \(batch, 2, H, W\), but got \(2, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 8, 8))
