"""Loading search spaces: the bundled quickstart, and an actionable error for each kind of bad input."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from errors import UserError
from methods import list_methods
from search.space.spec import load_space

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
    assert (space.task, space.model, space.sampler) == ("digits", "digits_cnn", "tpe")
    assert [str(c) for c in space.constraints] == ["accuracy_drop <= 0.1"]
    assert (space.budget.trials, space.budget.epochs, space.baseline_epochs) == (12, 3, 15)
    l1 = space.methods[0]
    assert l1.optional and (l1.searched["ratio"].low, l1.searched["ratio"].high) == (0.1, 0.7)
    assert space.methods[2].searched["bits"].choices == (2, 4, 8)
    assert space.source == QUICKSTART.read_text()


def test_bops_is_an_objective_lower_is_better(tmp_path: Path) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["objectives"] = {"accuracy": "max", "bops": "min"}
    path = tmp_path / "bops.yaml"
    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    assert [(o.metric, o.direction) for o in space.objectives] == [("accuracy", "max"), ("bops", "min")] and not space.warnings


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
        "methods: the pipeline minmax_quant > l1_filter cannot run: ",
        ["'minmax_quant' must be last", "'l1_filter' follows it", "Move 'minmax_quant' to the end"],
    ),
    (
        "bad sampler",
        _set("sampler", {"name": "nsga"}),
        "sampler.name: ",
        ["must be one of tpe, nsga2, gp, random, but got 'nsga'", "Did you mean 'nsga2'"],
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


def _unreadable(kind: str, tmp_path: Path, monkeypatch) -> Path:
    """A space path that cannot be read as a space, of the given kind."""
    path = tmp_path / "space.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1":
        path.write_bytes("name: caf\u00e9\ntask: digits\n".encode("latin-1"))
    elif kind == "large":
        with path.open("wb") as file:
            file.truncate(50_000_000)  # sparse: 50 MB on paper, nothing written
    elif kind == "unreadable":
        path.write_text(QUICKSTART.read_text())
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: refuse as the kernel would
            real_open = Path.open

            def refuse(self: Path, *args, **kwargs):
                if self == path:
                    raise PermissionError(13, "Permission denied", str(self))
                return real_open(self, *args, **kwargs)

            monkeypatch.setattr(Path, "open", refuse)
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("folder", "is a folder, not a space file"),
        ("binary", "is a binary file (a NUL byte at offset 0), not a YAML space."),
        ("latin-1", "is not UTF-8 text (byte 0xe9 at offset 9); save the space as UTF-8."),
        ("large", "is 50.0 MB, but a space file is a small YAML file (at most 1 MB); is this the right file?"),
        ("unreadable", "permission denied; make the file readable"),
    ],
)
def test_check_of_an_unreadable_space_is_one_line_and_exit_2(kind: str, says: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from search.cli import main

    path = _unreadable(kind, tmp_path, monkeypatch)
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"slimtune: error: {path}: {says}") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_bad_yaml_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("task: digits\nmodel: [digits_cnn\nmethods: {}\n")
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: ") and "(line 3, column 8)." in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# Duplicate keys, empty methods, command-line overrides, warnings.
# ----------------------------------------------------------------------------------------------


def test_method_listed_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(
        "task: digits\nmodel: digits_cnn\nmethods:\n  l1_filter: {params: {ratio: 0.3}}\n  kd: {}\n"
        "  l1_filter: {params: {ratio: 0.6}}\nobjectives: {accuracy: max, macs: min}\n"
    )
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(info.value) == (
        f"{path}: methods.l1_filter: given twice (lines 4 and 6); a method may be listed once, and YAML would "
        "silently keep only the last one. Merge the two entries into one."
    )


def test_any_key_given_twice_is_an_error_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False) + "budget:\n  trials: 4\n  epochs: 1\n  trials: 9\n")
    with pytest.raises(UserError) as info:
        load_space(path)
    lines = path.read_text().splitlines()
    first, second = [i + 1 for i, line in enumerate(lines) if line.strip().startswith("trials:")]
    assert str(info.value).startswith(f"{path}: budget.trials: given twice (lines {first} and {second}); a key may appear once")


def test_empty_methods_says_no_methods(tmp_path: Path) -> None:
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump(_edit(_set("methods", {})), sort_keys=False))
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(info.value).startswith(f"{path}: methods: no methods; list at least one")


def _yaml_error(tmp_path: Path, edit) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_edit(edit), sort_keys=False))
    with pytest.raises(UserError) as info:
        load_space(path)
    return str(info.value).removeprefix(f"{path}: ")


def _override_error(tmp_path: Path, **changes) -> str:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False))
    space = load_space(path)
    with pytest.raises(UserError) as info:
        space.with_overrides(**changes)
    message = str(info.value)
    assert message.startswith(f"overrides of {path}: "), message
    return message.removeprefix(f"overrides of {path}: ")


OVERRIDES = [
    ("trials 0", _set("budget", {"trials": 0}), {"trials": 0}, "budget.trials: must be >= 1, but got 0."),
    ("trials -2", _set("budget", {"trials": -2}), {"trials": -2}, "budget.trials: must be >= 1, but got -2."),
    ("budget's trials 0", _set("budget", {"trials": 0}), {"budget": {"trials": 0}}, "budget.trials: must be >= 1, but got 0."),
    ("epochs -1", _set("budget", {"epochs": -1}), {"epochs": -1}, "budget.epochs: must be >= 0, but got -1."),
    ("name with a slash", _set("name", "a/b"), {"name": "a/b"}, "name: may hold letters, digits, '_', '.' and '-' only"),
    ("name ..", _set("name", ".."), {"name": ".."}, "name: may hold letters, digits"),
    ("file store", _set("output", {"tracking_uri": "mlruns"}), {"tracking_uri": "mlruns"}, "output.tracking_uri: MLflow's file store"),
    (
        "file:// store",
        _set("output", {"tracking_uri": "file:///tmp/mlruns"}),
        {"tracking_uri": "file:///tmp/mlruns"},
        "output.tracking_uri: MLflow's file store",
    ),
    (
        "unknown scheme",
        _set("output", {"tracking_uri": "sqlit:///x.db"}),
        {"tracking_uri": "sqlit:///x.db"},
        "output.tracking_uri: unknown URI scheme 'sqlit'",
    ),
    ("empty results dir", _set("output", {"results_dir": " "}), {"results_dir": " "}, "output.results_dir: must be a folder path"),
]


@pytest.mark.parametrize(("edit", "changes", "says"), [o[1:] for o in OVERRIDES], ids=[o[0] for o in OVERRIDES])
def test_overrides_are_refused_with_the_yaml_error(tmp_path: Path, edit, changes: dict, says: str) -> None:
    from search.space.spec import Budget

    from_yaml = _yaml_error(tmp_path, edit)
    if "budget" in changes:
        changes = {"budget": Budget(**changes["budget"])}
    assert from_yaml.startswith(says), from_yaml
    assert _override_error(tmp_path, **changes) == from_yaml


def test_valid_overrides_apply(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False))
    space = load_space(path)
    changed = space.with_overrides(name="run-2", trials=3, tracking_uri="postgresql+psycopg2://db:5432/mlflow", results_dir=tmp_path / "r")
    assert (changed.name, changed.budget.trials, changed.tracking_uri, changed.results_dir) == (
        "run-2", 3, "postgresql+psycopg2://db:5432/mlflow", str(tmp_path / "r"),
    )  # fmt: skip
    assert changed.budget.epochs == space.budget.epochs == 2
    assert (space.name, space.budget.trials) == ("ok", 12)
    # Options the command line did not give (None) leave the space as it is.
    assert space.with_overrides(name=None, trials=None, tracking_uri=None, results_dir=None) == space
    assert space.with_overrides(budget=type(space.budget)(trials=5), epochs=4).budget == type(space.budget)(trials=5, epochs=4)


def test_quickstart_has_no_warnings() -> None:
    assert load_space(QUICKSTART).warnings == ()


def _warnings(tmp_path: Path, data: dict) -> tuple[str, ...]:
    path = tmp_path / "warn.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return tuple(w.removeprefix(f"{path}: ") for w in load_space(path).warnings)


def test_objective_against_its_metric_warns(tmp_path: Path) -> None:
    warnings = _warnings(tmp_path, _edit(_set("objectives", {"accuracy": "min", "macs": "max", "params": "min"})))
    assert len(warnings) == 2
    assert warnings[0].startswith("objectives.accuracy: min minimises accuracy, for which higher is better")
    assert warnings[0].endswith("Did you mean `accuracy: max`?")
    assert warnings[1].startswith("objectives.macs: max maximises macs, for which lower is better")


CONSTRAINTS = [
    ("accuracy >= 2.0", "never holds"),
    ("accuracy <= -0.1", "never holds"),
    ("accuracy <= 1", "always holds"),
    ("accuracy_drop <= 1.5", "always holds"),
    ("macs <= -5", "never holds"),
    ("latency_ms >= 0", "always holds"),
    ("accuracy >= 0.9", None),
    ("accuracy_drop <= 0.02", None),
    ("macs <= 1e6", None),
]


@pytest.mark.parametrize(("constraint", "says"), CONSTRAINTS)
def test_constraint_outside_its_metric_range_is_refused_or_warns(tmp_path: Path, constraint: str, says: str | None) -> None:
    expected = f"constraints[0]: '{constraint.replace('2.0', '2')}' {says}"
    if says == "never holds":
        # No trial could be feasible: refused before any budget is spent.
        with pytest.raises(UserError) as info:
            _warnings(tmp_path, _edit(_set("constraints", [constraint])))
        assert str(info.value).startswith(f"{tmp_path / 'warn.yaml'}: {expected}"), str(info.value)
        assert "\n" not in str(info.value)
        return
    warnings = _warnings(tmp_path, _edit(_set("constraints", [constraint])))
    if says is None:
        assert warnings == ()
    else:
        assert len(warnings) == 1
        assert warnings[0].startswith(expected), warnings[0]


def test_two_view_ranges(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "spaces" / "digits_2view.yaml").read_text())
    data["constraints"] = ["rank1 >= 90", "mAP_drop <= 0.05", "rank10_drop <= 0.02"]  # names with digits parse
    with pytest.raises(UserError, match=r"constraints\[0\]: 'rank1 >= 90' never holds.*\(a fraction: write 0.9 for 90%\)"):
        _warnings(tmp_path, data)
    data["constraints"] = ["rank1 >= 0.9", "mAP_drop <= 0.05", "rank10_drop <= 0.02"]
    assert _warnings(tmp_path, data) == ()


def test_super_resolution_ranges(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "spaces" / "sr_quickstart.yaml").read_text())
    data["objectives"] = {"psnr": "min", "ssim": "max"}
    data["constraints"] = ["ssim >= -1.5", "psnr >= 30", "psnr <= 1e9"]
    warnings = _warnings(tmp_path, data)
    assert [w.split(":")[0] for w in warnings] == ["objectives.psnr", "constraints[0]"]
    assert "ssim lies within [-1, 1]" in warnings[1]
    data["constraints"] = ["psnr <= -1"]
    with pytest.raises(UserError, match=r"constraints\[0\]: 'psnr <= -1' never holds.*psnr lies within \[0, inf\]"):
        _warnings(tmp_path, data)
