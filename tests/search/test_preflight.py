"""What ``slimtune check`` pre-flights: each searched hyperparameter at the end its declaration
says compresses more, and every budget field capped at one epoch."""

from __future__ import annotations

from typing import Any

import pytest

from methods import Range
from search.space.spec import MethodSpace
from search.trial.context import _short_training
from search.trial.preflight import aggressive_params


def most_aggressive(name: str, **searched: Range) -> dict[str, Any]:
    return aggressive_params(MethodSpace(name=name, optional=False, fixed={}, searched=searched))


def test_numbers_take_the_declared_end_and_the_low_end_otherwise() -> None:
    # lam and mask_lr compress at the high end, mask_step at the low end, mu declares nothing.
    params = most_aggressive("gal", lam=Range(0.01, 2.0), mask_lr=Range(0.001, 0.02), mask_step=Range(5, 50), mu=Range(0.2, 0.9))
    assert params == {"lam": 2.0, "mask_lr": 0.02, "mask_step": 5, "mu": 0.2}
    assert most_aggressive("minmax_quant", bits=Range(choices=(8, 2, 4))) == {"bits": 2}
    assert most_aggressive("od", groups=Range(choices=(4, 16, 2))) == {"groups": 16}


@pytest.mark.parametrize("order", [("channel", "joint", "block"), ("joint", "block", "channel"), ("block", "channel", "joint")])
def test_choices_follow_the_order_of_their_type_not_of_the_space(order: tuple[str, ...]) -> None:
    # gal.structure is Literal["auto", "channel", "block", "joint"] with compresses="high".
    assert most_aggressive("gal", structure=Range(choices=order)) == {"structure": "joint"}
    # od.conv is Literal["shift", "dw", "group"] with compresses="low".
    assert most_aggressive("od", conv=Range(choices=("group", "dw", "shift"))) == {"conv": "shift"}
    assert most_aggressive("od", conv=Range(choices=("group", "dw"))) == {"conv": "dw"}


def test_none_in_the_choices_is_the_low_end() -> None:
    assert most_aggressive("od", epochs=Range(choices=(5, None, 3))) == {"epochs": None}


def test_fixed_values_are_kept() -> None:
    space = MethodSpace(name="l1_filter", optional=False, fixed={"round_to": 4}, searched={"ratio": Range(0.2, 0.6)})
    assert aggressive_params(space) == {"round_to": 4, "ratio": 0.6}


def test_budget_fields_are_capped_at_one_epoch() -> None:
    gal = _short_training({"name": "gal", "params": {"adversarial_epochs": 10, "finetune_epochs": 3, "lam": 5.0}})
    assert gal == {"adversarial_epochs": 1, "finetune_epochs": 1, "lam": 5.0}
    # Unset (None) stays unset: it trains the pre-flight's one epoch; 0 stays 0.
    assert _short_training({"name": "od", "params": {}}) == {}
    assert _short_training({"name": "gal", "params": {"finetune_epochs": 0}}) == {"finetune_epochs": 0}
    assert _short_training({"name": "pams", "params": {"stats_epochs": 4, "epochs": 2}}) == {"stats_epochs": 1, "epochs": 1}


def test_check_lists_per_method_the_layers_it_changes_on_a_users_model(capsys, tmp_path) -> None:
    """``slimtune check`` of a space whose model is a user's attention network (by file reference):
    under each method, the layers it changes and those it leaves alone with the reason."""
    from pathlib import Path

    from search.cli import main

    models = Path(__file__).resolve().parent.parent / "methods" / "foreign_models.py"
    space = tmp_path / "space.yaml"
    space.write_text(
        f"""
name: attention_check
task: digits
model: {{import: "{models}:TinyAttention"}}
methods:
  l1_filter: {{optional: true, params: {{ratio: {{low: 0.2, high: 0.5}}}}}}
  kd: {{optional: true}}
objectives: {{accuracy: max, macs: min}}
budget: {{trials: 2, concurrent: 1, epochs: 1, cpus_per_trial: 1}}
output: {{results_dir: "{tmp_path / "results"}", tracking_uri: "sqlite:///{tmp_path / "mlflow.db"}"}}
"""
    )
    assert main(["check", str(space)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if "[ok  ] l1_filter (ratio=0.5)" in line)
    assert lines[at + 1].strip() == "changes 1 layer: mlp.0"
    left = [line.strip() for line in lines[at + 2 : at + 6] if line.strip().startswith("leaves alone")]
    assert any(line.startswith("leaves alone attention") and "multi-head attention" in line for line in left), left
    assert any(line.startswith("leaves alone head (the classifier") for line in left), left
    at_kd = next(i for i, line in enumerate(lines) if "[ok  ] kd" in line)
    assert lines[at_kd + 1].strip() == "changes no layer (it changes how the model is trained)"
    assert lines[-1].endswith("valid (all 3 pre-flight checks passed)")


def test_describe_touches_groups_by_reason_and_caps_the_names() -> None:
    from methods import Touches
    from search.trial.preflight import NAMES_SHOWN, describe_touches

    changed = tuple(f"block{i}.conv" for i in range(NAMES_SHOWN + 3))
    touches = Touches(changed, (("stem", "the first layer"), ("fc", "the classifier"), ("head", "the classifier")))
    lines = describe_touches(touches, "Conv2d layers")
    assert lines[0] == f"changes {NAMES_SHOWN + 3} layers: " + ", ".join(changed[:NAMES_SHOWN]) + " and 3 more"
    assert lines[1:] == ["leaves alone stem (the first layer)", "leaves alone fc, head (the classifier)"]
