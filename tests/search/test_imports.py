"""Your own model and task by import reference: ``model: {import: "net.py:Net"}``, ``task: {import: ...}``.

Every file here is written by the test into its own folder, outside the package; each test's
modules have names of their own, since a file is imported as the module named after its stem.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from errors import UserError
from search.cli import main
from search.space.spec import load_space

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2), 1))


def build(num_classes, hidden=6):
    # No in_channels: the factory is called without it.
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module(num_classes):
    return "a string"


def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
"""

TASK = """
import torch
from torch.utils.data import TensorDataset

from tasks import Task


class Digits(Task):
    kind = "classification"
    metric_directions = {"accuracy": "max"}

    def __init__(self, limit=300):
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images[:limit] / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(data.target[:limit], dtype=torch.int64)
        a, b = int(0.6 * limit), int(0.8 * limit)
        super().__init__(
            name="user_digits", num_classes=10, input_shape=(1, 8, 8),
            train_set=TensorDataset(x[:a], y[:a]), val_set=TensorDataset(x[a:b], y[a:b]), test_set=TensorDataset(x[b:], y[b:]),
        )


class Regression(Digits):
    kind = "regression"
    metric_directions = {"mse": "min"}


class NoTrainSet(Digits):
    def __init__(self, limit=300):
        super().__init__(limit)
        self.train_set = None


class BadKind(Digits):
    kind = "detection"


class NoDirections(Task):
    kind = "classification"


class NotATask:
    pass
"""

SPACE = """
name: {name}
task: {task}
model: {model}
baseline: {{epochs: 1}}
methods:
  l1_filter:
    optional: false
    params: {{ratio: {{low: 0.2, high: 0.5}}}}
objectives: {objectives}
budget: {{trials: 2, concurrent: 1, epochs: 1, cpus_per_trial: 1}}
sampler: {{name: random, seed: 1}}
measure: {{latency_repeats: 2}}
"""


def _stem(tmp_path: Path, kind: str) -> str:
    # One module name per test: a file is imported as the module named after its stem.
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', tmp_path.name)}"


def _files(tmp_path: Path) -> tuple[str, str]:
    """Write the model and task files into ``tmp_path/user_code`` and return their file names."""
    code = tmp_path / "user_code"
    code.mkdir(exist_ok=True)
    net, task = _stem(tmp_path, "net") + ".py", _stem(tmp_path, "task") + ".py"
    (code / net).write_text(NET)
    (code / task).write_text(TASK)
    return net, task


def _space(
    tmp_path: Path,
    model: str = "Net",
    task: str = "Digits",
    model_options: str = "{width: 4}",
    objectives: str = "{accuracy: max, macs: min}",
    name: str = "mine",
) -> Path:
    net, task_file = _files(tmp_path)
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(
        name=name,
        task=f'{{import: "user_code/{task_file}:{task}", options: {{limit: 300}}}}',
        model=f'{{import: "user_code/{net}:{model}", options: {model_options}}}',
        objectives=objectives,
    ))  # fmt: skip
    return path


def test_a_space_names_the_model_and_task_files_relative_to_itself(tmp_path: Path, monkeypatch) -> None:
    path = _space(tmp_path)
    monkeypatch.chdir("/")
    space = load_space(path)
    net, task = _files(tmp_path)
    assert space.model == f"import:{tmp_path / 'user_code' / net}:Net" and space.model_options == {"width": 4}
    assert space.task == f"import:{tmp_path / 'user_code' / task}:Digits" and space.task_options == {"limit": 300}
    # The stored document names the files absolutely, so the search is read back from anywhere.
    again = load_space(_write(tmp_path / "elsewhere" / "resolved.yaml", space.resolved_source))
    assert (again.model, again.task, again.model_options, again.task_options) == (space.model, space.task, {"width": 4}, {"limit": 300})


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_model_gets_num_classes_and_in_channels_when_it_takes_them(tmp_path: Path) -> None:
    from search.trial.context import build_model, load_task

    space = load_space(_space(tmp_path))
    task = load_task(space)
    model = build_model(space, task)
    assert type(model).__name__ == "Net" and model.conv.in_channels == 1 and model.conv.out_channels == 4 and model.fc.out_features == 10
    # A function without in_channels gets num_classes and its options only.
    space = load_space(_space(tmp_path, model="build", model_options="{hidden: 7}"))
    model = build_model(space, task)
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [7, 10]


def test_a_user_task_declares_its_metrics_for_objectives_and_its_kind_for_methods(tmp_path: Path) -> None:
    from tasks import task_kind, task_metrics

    space = load_space(_space(tmp_path, task="Regression", objectives="{mse: min, macs: min}"))
    assert task_metrics(space.task) == {"mse": "min"} and task_kind(space.task) == "regression"
    with pytest.raises(UserError, match=r"objectives.accuracy: unknown metric 'accuracy'.* Known metrics: mse, mse_drop"):
        load_space(_space(tmp_path, task="Regression"))


@pytest.mark.parametrize(
    ("key", "ref", "message"),
    [
        ("model", "user_code/{net}:Nett", r"user_code/{net} has no attribute 'Nett'\. Did you mean 'Net'\?$"),
        ("model", "user_code/x{net}:Net", r"no such file .*/user_code/x{net}\. Did you mean '{net}'"),
        ("model", "torchvison.models:resnet18", r"no module 'torchvison' \(importing 'torchvison.models'\)\. Did you mean 'torchvision'"),
        ("model", "torchvision.modls:resnet18", r"no module 'torchvision.modls' .*Did you mean 'models'"),
        ("model", "user_code/broken.py:Net", r"user_code/broken\.py: fails to import: NameError: name 'undefined_name' is not defined$"),
        ("model", "no_colon", r"must read 'package.module:attr' or 'path/to/file.py:attr'"),
        ("task", "user_code/{task}:NotATask", r"not a subclass of tasks\.Task"),
        (
            "task",
            "user_code/{task}:NoDirections",
            r"NoDirections lacks the class attribute metric_directions \(e\.g\. metric_directions = \{{'accuracy': 'max'\}}\)",
        ),
        ("task", "user_code/{task}:BadKind", r"kind must be one of classification, .*but BadKind\.kind is 'detection'\.$"),
    ],
)
def test_a_bad_reference_is_one_line_naming_the_file_and_key(tmp_path: Path, key: str, ref: str, message: str, capsys) -> None:
    net, task = _files(tmp_path)
    (tmp_path / "user_code" / "broken.py").write_text("x = 1\nundefined_name\n")
    path = _space(tmp_path)
    text = path.read_text()
    old = re.search(rf'^{key}: \{{import: "([^"]+)"', text, re.M).group(1)
    path.write_text(text.replace(old, ref.format(net=net, task=task)))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"slimtune: {path}: {key}.import: ") or err.startswith(f"slimtune: error: {path}: {key}.import: "), err
    assert re.search(message.format(net=net, task=task), err), err


@pytest.mark.parametrize(
    ("model", "task", "message"),
    [
        ("not_a_module", "Digits", r"space\.yaml: model\.import: model 'import:.*:not_a_module': returned str, not an nn\.Module"),
        (
            "five_classes",
            "Digits",
            r"model: 'import:.*:five_classes' outputs shape \(\d+, 5\), which does not fit task .*one logit per class",
        ),
        (
            "Net",
            "NoTrainSet",
            r"space\.yaml: task\.import: task 'import:.*:NoTrainSet': train_set must be a map-style dataset .*, but got NoneType\.$",
        ),
    ],
)
def test_a_model_or_task_that_does_not_fit_is_one_line_at_check(tmp_path: Path, model: str, task: str, message: str, capsys) -> None:
    path = _space(tmp_path, model=model, task=task, model_options="{}")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_user_checkpoint_loads_and_one_of_another_model_names_the_keys(tmp_path: Path, capsys) -> None:
    from search.driver.checks import check_files
    from search.trial.body import train_baseline
    from search.trial.context import build_model, load_task

    space = load_space(_space(tmp_path))
    trained = build_model(space, load_task(space))
    with torch.no_grad():
        trained.fc.bias.fill_(0.25)
    torch.save(trained.state_dict(), tmp_path / "mine.pt")
    text = (tmp_path / "space.yaml").read_text().replace("baseline: {epochs: 1}", "baseline: {checkpoint: mine.pt}")
    (tmp_path / "space.yaml").write_text(text)
    space = load_space(tmp_path / "space.yaml")
    check_files(space)
    baseline, _ = train_baseline(space, torch.device("cpu"), log=lambda line: None)
    assert torch.equal(baseline.fc.bias, torch.full((10,), 0.25))
    state = trained.state_dict()
    state["head.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "mine.pt")
    with pytest.raises(UserError, match=r"keys missing 1 \(fc\.weight\); unexpected 1 \(head\.weight\)"):
        check_files(space)


def test_the_baseline_key_and_the_recipe_cover_the_user_files(tmp_path: Path) -> None:
    from search.driver.baselines import baseline_key
    from search.trial.recipe import changed_imports, imported_code

    space = load_space(_space(tmp_path))
    net, task = _files(tmp_path)
    before = json.dumps(baseline_key(space), sort_keys=True, default=str)
    imports = imported_code(space)
    assert imports["model"]["ref"] == f"{tmp_path / 'user_code' / net}:Net"
    assert list(imports["model"]["sha256"]) == [str(tmp_path / "user_code" / net)] and list(imports["task"]["sha256"]) == [
        str(tmp_path / "user_code" / task)
    ]
    assert changed_imports({"imports": imports}) == []
    (tmp_path / "user_code" / net).write_text(NET + "\n# retuned\n")
    assert json.dumps(baseline_key(space), sort_keys=True, default=str) != before
    (warning,) = changed_imports({"imports": imports})
    assert warning.startswith(
        f"warning: model.import {imports['model']['ref']}: {tmp_path / 'user_code' / net} changed since the trial ran"
    )


def test_the_user_code_travels_to_a_clusters_workers(tmp_path: Path) -> None:
    from search.driver.runner import user_code_roots

    space = load_space(_space(tmp_path))
    assert user_code_roots(space) == [tmp_path / "user_code"]


def test_a_worker_without_the_path_finds_the_file_in_the_shipped_folder(tmp_path: Path, monkeypatch) -> None:
    """On a cluster the folder arrives as a py_module named after it; the absolute path may not exist there."""
    from errors.user_code import import_ref

    stem = _stem(tmp_path, "shipped")
    shipped = tmp_path / "site" / f"pkg_{stem}"
    _write(shipped / f"{stem}.py", "VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert import_ref(f"/nowhere/pkg_{stem}/{stem}.py:VALUE") == 42
    monkeypatch.delitem(sys.modules, stem)


@pytest.mark.slow
def test_a_search_of_user_files_exports_and_replays(tmp_path: Path, capsys) -> None:
    """Model and task files outside the package: searched with trials in Ray workers, exported, replayed."""
    from search.driver.runner import run_search
    from search.results.record import completed_records

    path = _space(tmp_path, name="user_search", model_options="{width: 8}")
    # Enough baseline training for a model that learnt something (a baseline at chance is refused).
    path.write_text(path.read_text().replace("baseline: {epochs: 1}", "baseline: {epochs: 4}\ntraining: {lr: 0.1, batch_size: 32}"))
    with contextlib.redirect_stdout(io.StringIO()):
        record = run_search(path, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=lambda m: None)
    assert record.trials == 2 and len(completed_records(record)) == 2
    export = tmp_path / "export"
    assert main(["export", "user_search", "--pick", "max-accuracy", "--out", str(export), "--results-dir", str(tmp_path / "results")]) == 0
    recipe = json.loads((export / "recipe.json").read_text())
    net, _ = _files(tmp_path)
    assert recipe["model"]["name"] == f"import:{tmp_path / 'user_code' / net}:Net"
    assert recipe["imports"]["model"]["sha256"][str(tmp_path / "user_code" / net)] == __import__("hashlib").sha256(NET.encode()).hexdigest()
    assert recipe["metrics"]["accuracy"] > 0.1
    capsys.readouterr()
    assert main(["replay", str(export / "recipe.json"), "--out", str(tmp_path / "replayed")]) == 0
    printed = capsys.readouterr().out
    assert "metrics equal the recipe's" in printed and "changed since" not in printed
    (tmp_path / "user_code" / net).write_text(NET + "\n# edited after the search\n")
    assert main(["replay", str(export / "recipe.json"), "--out", str(tmp_path / "replayed_again")]) == 0
    assert "changed since the trial ran" in capsys.readouterr().out


def test_a_folder_that_would_hide_a_module_on_the_workers_is_refused(tmp_path: Path) -> None:
    from search.driver.runner import _refuse_shadowing

    with pytest.raises(UserError, match=r"/code: .* it would hide the module 'code' \(.*code\.py\); move the files"):
        _refuse_shadowing(tmp_path / "code")
    _refuse_shadowing(tmp_path / "user_code")


def test_an_import_name_written_as_text_is_made_absolute_too(tmp_path: Path, monkeypatch) -> None:
    net, _ = _files(tmp_path)
    path = _space(tmp_path)
    path.write_text(re.sub(r"^model: .*$", f"model: import:user_code/{net}:build", path.read_text(), flags=re.M))
    monkeypatch.chdir("/")
    assert load_space(path).model == f"import:{tmp_path / 'user_code' / net}:build"


def test_profile_builds_the_user_model_on_the_user_task(tmp_path: Path, monkeypatch, capsys) -> None:
    net, task = _files(tmp_path)
    monkeypatch.chdir(tmp_path / "user_code")
    assert main(["profile", f"{net}:Net", "--task", f"{task}:Digits", "--model-option", "width=4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # conv 1->4 channels, 3x3 on 8x8: 4*9*64 = 2304; fc 4*16 -> 10: 640.
    assert (report["input_shape"], report["macs"]) == ([1, 8, 8], 2304 + 640)
    assert report["task"] == f"import:{tmp_path / 'user_code' / task}:Digits"


def test_a_module_reference_travels_as_its_package_or_its_file(tmp_path: Path, monkeypatch) -> None:
    from errors.user_code import import_ref, ref_roots
    from search.driver.runner import _refuse_shadowing, local_import_paths

    stem = _stem(tmp_path, "pkg")
    _write(tmp_path / "site" / stem / "__init__.py", "")
    _write(tmp_path / "site" / stem / "nets.py", NET)
    _write(tmp_path / "site" / f"{stem}_single.py", NET)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert import_ref(f"{stem}.nets:Net").__name__ == "Net"
    assert ref_roots(f"{stem}.nets:Net") == [tmp_path / "site" / stem]
    assert ref_roots(f"{stem}_single:Net") == [tmp_path / "site" / f"{stem}_single.py"]
    assert ref_roots("torch.nn:Linear") == []  # installed: every worker has it
    # A namespace package (no __init__.py, as this repository's examples/): its folder, whose parent
    # a local Ray's workers get on their path, whatever the driver's current folder.
    _write(tmp_path / "site" / f"{stem}_ns" / "nets.py", NET)
    assert ref_roots(f"{stem}_ns.nets:Net") == [tmp_path / "site" / f"{stem}_ns"]
    assert local_import_paths([tmp_path / "site" / f"{stem}_ns", tmp_path / "site" / stem]) == [str(tmp_path / "site")] * 2
    assert local_import_paths([tmp_path / "user_code"]) == []  # a file reference's folder: loaded from its path
    for root in (tmp_path / "site" / stem, tmp_path / "site" / f"{stem}_single.py"):
        _refuse_shadowing(root)
    for name in (stem, f"{stem}.nets", f"{stem}_single", f"{stem}_ns", f"{stem}_ns.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
