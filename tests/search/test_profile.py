"""``slimtune profile`` on super-resolution models, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from search.cli import main


def _edsr_small_macs(lr_side: int, scale: int) -> int:
    """EDSR-small by hand: 3x3 convs, 32 features, 4 blocks, a sub-pixel upsampler, the last conv at HR."""
    lr, hr = lr_side**2, (lr_side * scale) ** 2
    head = 3 * 32 * 9 * lr
    body = (2 * 4 + 1) * 32 * 32 * 9 * lr
    # x2 and x3: one conv to scale^2 * 32 channels; x4: two x2 stages, the second at twice the side.
    if scale == 4:
        upsample = 32 * 128 * 9 * (lr + 4 * lr)
    else:
        upsample = 32 * scale**2 * 32 * 9 * lr
    tail = 32 * 3 * 9 * hr
    return head + body + upsample + tail


@pytest.mark.parametrize(("argv", "scale", "side"), [([], 2, 24), (["--task", "sr", "--scale", "3"], 3, 16), (["--scale", "4"], 4, 12)])
def test_profile_super_resolution_at_the_sr_tasks_patch(capsys, argv: list[str], scale: int, side: int) -> None:
    assert main(["profile", "edsr_small", "--json", *argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["scale"], report["input_shape"]) == ("sr", scale, [3, side, side])
    assert report["macs"] == _edsr_small_macs(side, scale)
    assert _edsr_small_macs(24, 2) == 71_497_728


def test_profile_edsr_parameters_match_the_paper(capsys) -> None:
    assert main(["profile", "edsr", "--task", "sr", "--scale", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 1_554_499


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["digits_cnn", "--batch-size", "0"], "--batch-size must be at least 1, but got 0."),
        (["digits_cnn", "--batch-size", "-3"], "--batch-size must be at least 1, but got -3."),
        (["resnet20", "--scale", "2"], "--scale applies to super-resolution models (--task sr), but the task is cifar10"),
        (["edsr_small", "--scale", "5"], "--scale must be one of 2, 3, 4, but got 5."),
        (["resnet20", "--task", "sr"], "model 'resnet20' is a classifier and needs num_classes"),
    ],
)
def test_profile_errors_are_one_line_and_exit_2(capsys, argv: list[str], message: str) -> None:
    assert main(["profile", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and message in captured.err
