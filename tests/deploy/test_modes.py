"""eval_mode: eval inside the block, every module's own mode after it."""

from __future__ import annotations

import pytest
from torch import nn

from deploy import eval_mode


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Linear(2, 2), nn.Dropout()))


def test_every_module_gets_its_own_mode_back_even_when_the_block_raises() -> None:
    model = _model().train()
    model[1].eval()  # a frozen batch norm in a training model
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model) as inside:
            assert inside is model and not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


@pytest.mark.parametrize("training", [True, False])
def test_a_module_put_in_during_the_block_takes_the_roots_mode_and_one_taken_out_its_own(training: bool) -> None:
    model = _model().train(training)
    removed = model[2]
    with eval_mode(model):
        model[2] = nn.Sequential(removed[0], nn.BatchNorm1d(2).train(not training))  # surgery: a new module
    assert [m.training for m in model.modules()] == [training] * 6
    assert removed.training is training and removed[1].training is training
