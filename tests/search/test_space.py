"""Loading search spaces: the bundled quickstart, and an actionable error for each kind of bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from methods import list_methods
from errors import UserError
from search.space import load_space

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "spaces" / "quickstart.yaml"

VALID = {
    "task": "digits",
    "model": "digits_cnn",
    "methods": {
        "l1_filter": {"optional": True, "params": {"ratio": {"low": 0.1, "high": 0.7}}},
        "minmax_quant": {"params": {"bits": 8}},
    },
    "objectives": {"accuracy": "max", "macs": "min"},
    "constraints": ["accuracy_drop <= 0.1"],
    "sampler": {"name": "tpe"},
}


def test_quickstart_loads() -> None:
    space = load_space(QUICKSTART)
    assert [m.name for m in space.methods] == ["l1_filter", "kd", "minmax_quant"]
    assert [(o.metric, o.direction) for o in space.objectives] == [("accuracy", "max"), ("macs", "min"), ("size_bytes", "min")]
    assert (space.task, space.model, space.sampler) == ("digits", "digits_cnn", "nsga2")
    assert [str(c) for c in space.constraints] == ["accuracy_drop <= 0.1"]
    assert (space.budget.trials, space.budget.epochs, space.baseline_epochs) == (12, 3, 15)
    l1 = space.methods[0]
    assert l1.optional and (l1.searched["ratio"].low, l1.searched["ratio"].high) == (0.1, 0.7)
    assert space.methods[2].searched["bits"].choices == (2, 4, 8)
    assert space.source == QUICKSTART.read_text()


def test_valid_snippet_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False))
    space = load_space(path)
    assert space.name == "ok"
    assert space.methods[1].fixed == {"bits": 8} and space.methods[1].optional is True
    assert space.sampler == "tpe"


def test_null_leaves_a_hyperparameter_to_the_space(tmp_path: Path) -> None:
    path = tmp_path / "od.yaml"
    data = {**VALID, "methods": {"od": {"optional": False, "params": {"epochs": None, "lr": None, "conv": {"choices": ["shift", "dw"]}}}}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    (od,) = load_space(path).methods
    assert od.fixed == {"epochs": None, "lr": None}
    assert od.searched["conv"].choices == ("shift", "dw")


def _edit(change) -> dict:
    data = copy.deepcopy(VALID)
    change(data)
    return data


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(data):
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


def _delete(key):
    return lambda data: data.pop(key)


# (id, edit of VALID, key path in the message, what the message must also say: the rule or the fix)
BAD = [
    ("unknown top key", _set("budjet", {"trials": 3}), "budjet: ", ["unknown key", "Did you mean 'budget'"]),
    (
        "unknown method",
        _set("methods", {"l1_filtr": {}}),
        "methods.l1_filtr: ",
        ["unknown method 'l1_filtr'", "Did you mean 'l1_filter'", f"Known methods: {', '.join(list_methods())}."],
    ),
    (
        "unknown hyperparameter",
        _set("methods", "l1_filter", "params", {"ratoi": 0.3}),
        "methods.l1_filter.params.ratoi: ",
        ["unknown key", "Did you mean 'ratio'", "Allowed keys: ratio, round_to"],
    ),
    (
        "out of range",
        _set("methods", "l1_filter", "params", {"ratio": 1.5}),
        "methods.l1_filter.params.ratio: ",
        ["`0 <= ratio < 1` must hold, but got ratio=1.5"],
    ),
    (
        "range end out of range",
        _set("methods", "l1_filter", "params", {"ratio": {"low": 0.1, "high": 1.2}}),
        "methods.l1_filter.params.ratio: ",
        ["`0 <= ratio < 1` must hold, but got ratio=1.2"],
    ),
    (
        "wrong type of hyperparameter",
        _set("methods", "l1_filter", "params", {"ratio": "high"}),
        "methods.l1_filter.params.ratio: ",
        ["`ratio` must be of type float, but got 'high'"],
    ),
    (
        "wrong type of choice",
        _set("methods", "minmax_quant", "params", {"bits": {"choices": [4, "eight"]}}),
        "methods.minmax_quant.params.bits: ",
        ["`bits` must be of type int, but got 'eight'"],
    ),
    (
        "choice with a typo",
        _set("methods", {"gal": {"params": {"structure": "blok"}}}),
        "methods.gal.params.structure: ",
        ["`structure` must be one of auto, channel, block, joint, but got 'blok'.", "Did you mean 'block'?"],
    ),
    (
        "searched choice with a typo",
        _set("methods", {"gal": {"params": {"structure": {"choices": ["joint", "chanel"]}}}}),
        "methods.gal.params.structure: ",
        ["`structure` must be one of auto, channel, block, joint, but got 'chanel'.", "Did you mean 'channel'?"],
    ),
    (
        "wrong type of an optional hyperparameter",
        _set("methods", {"od": {"params": {"epochs": "ten"}}}),
        "methods.od.params.epochs: ",
        ["`epochs` must be of type int or null (None), but got 'ten'."],
    ),
    (
        "range of an optional hyperparameter",
        _set("methods", {"od": {"params": {"epochs": {"low": -1, "high": 3}}}}),
        "methods.od.params.epochs: ",
        ["`epochs >= 0` must hold, but got epochs=-1"],
    ),
    (
        "wrong type of flag",
        _set("methods", "l1_filter", "optional", "yes"),
        "methods.l1_filter.optional: ",
        ["must be true or false, but got 'yes'"],
    ),
    ("wrong type of budget", _set("budget", {"trials": "ten"}), "budget.trials: ", ["must be a number, but got 'ten'"]),
    ("one objective", _set("objectives", {"accuracy": "max"}), "objectives: ", ["must name 2 to 4 metrics, but names 1"]),
    (
        "five objectives",
        _set("objectives", {"accuracy": "max", "macs": "min", "params": "min", "size_bytes": "min", "latency_ms": "min"}),
        "objectives: ",
        ["must name 2 to 4 metrics, but names 5"],
    ),
    (
        "unknown metric",
        _set("objectives", {"acuracy": "max", "macs": "min"}),
        "objectives.acuracy: ",
        ["unknown metric 'acuracy'", "Did you mean 'accuracy'", "Known metrics: accuracy,"],
    ),
    (
        "bad direction",
        _set("objectives", {"accuracy": "maximise", "macs": "min"}),
        "objectives.accuracy: ",
        ["must be one of min, max, but got 'maximise'"],
    ),
    (
        "bad constraint syntax",
        _set("constraints", ["accuracy_drop < 0.1"]),
        "constraints[0]: ",
        ["must read 'METRIC <= NUMBER' or 'METRIC >= NUMBER', but got 'accuracy_drop < 0.1'"],
    ),
    (
        "constraint on unknown metric",
        _set("constraints", ["latency <= 5"]),
        "constraints[0]: ",
        ["unknown metric 'latency'", "Did you mean 'latency_ms'"],
    ),
    (
        "must-be-last method not last",
        _set("methods", {"minmax_quant": {}, "l1_filter": {}}),
        "methods.minmax_quant: ",
        ["must be the last method", "Move it to the end"],
    ),
    (
        "bad sampler",
        _set("sampler", {"name": "nsga"}),
        "sampler.name: ",
        ["must be one of nsga2, tpe, random, but got 'nsga'", "Did you mean 'nsga2'"],
    ),
    ("missing task", _delete("task"), "task: ", ["is missing", "every space names a task, a model, methods and objectives"]),
]


@pytest.mark.parametrize(("edit", "key_path", "says"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_space_names_file_key_and_fix(tmp_path: Path, edit, key_path: str, says: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_edit(edit), sort_keys=False))
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key_path}"), message
    for part in says:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("task: digits\nmethods: [l1_filter\nobjectives: {accuracy: max}\n")
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "line 3" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- task\n- model\n")
    with pytest.raises(UserError, match=r"must be a mapping of keys to values, but got \['task', 'model'\]") as info:
        load_space(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(info.value) == f"{path}: no such file."


def test_missing_file_points_at_a_bundled_space_of_that_name(tmp_path: Path) -> None:
    path = tmp_path / "quickstart.yaml"
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(info.value) == f"{path}: no such file. A space of that name ships with slimtune: {QUICKSTART}."
