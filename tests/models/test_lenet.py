"""LeNet: the sizes of the digits variant and of Caffe's LeNet-5 (the SSR paper's baseline)."""

from __future__ import annotations

import pytest
import torch

from deploy import count_flops, count_params
from models import LeNet, create_model


def test_digits_lenet_shapes_and_size() -> None:
    model = create_model("digits_lenet", 10, in_channels=1).eval()
    assert isinstance(model, LeNet)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    # conv 1->16 (3x3) 160, conv 16->32 4,640, fc 128->64 8,256, fc 64->10 650.
    assert count_params(model) == 13_706
    # 16*9*64 + 32*16*9*16 + 128*64 + 64*10 multiply-accumulates.
    assert count_flops(model, torch.zeros(1, 1, 8, 8)).macs == 91_776
    assert model.fc1.in_features == 32 * 2 * 2


def test_lenet5_matches_the_ssr_papers_baseline() -> None:
    """The paper's LeNet (20-50-500) on MNIST: 2.3M FLOPs (MACs) and 0.43M parameters."""
    model = create_model("lenet5", 10, in_channels=1).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(model) == 431_080
    macs = count_flops(model, torch.zeros(1, 1, 28, 28)).macs
    assert macs == 2_293_000
    assert macs == pytest.approx(2.3e6, rel=0.01)
