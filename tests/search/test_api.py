"""The Python API (``search.api``): a search from a dict or a file, with Python objects in place of references."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import pytest
import torch

from errors import UserError
from examples.own_model.digits_task import DigitsTask
from examples.own_model.tiny_net import TinyNet
from search import api

SPACE = {
    "name": "api_search",
    "baseline": {"epochs": 2},
    "training": {"lr": 0.1, "batch_size": 32},
    "methods": {"l1_filter": {"optional": False, "params": {"ratio": {"low": 0.2, "high": 0.5}}}},
    "objectives": {"accuracy": "max", "macs": "min"},
    "budget": {"trials": 2, "concurrent": 1, "epochs": 1, "cpus_per_trial": 1},
    "sampler": {"name": "random", "seed": 1},
    "measure": {"latency_repeats": 2},
}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (on 127.0.0.1) for the searches of this module; each search leaves it running."""
    import ray

    from search.driver.runner import _init_ray

    _init_ray(None)
    yield
    ray.shutdown()


def _quiet(line: str) -> None:
    pass


def test_a_dict_with_a_bad_key_reads_as_the_yaml_does(tmp_path: Path) -> None:
    from search.space.spec import load_space

    bad = {**SPACE, "task": "digits", "model": "digits_cnn", "budgett": {}}
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError) as from_file:
        load_space(path)
    with pytest.raises(UserError) as from_dict:
        api.search(bad)
    assert (
        str(from_file.value)
        == f"{path}: budgett: unknown key. Did you mean 'budget'? Allowed keys: " + str(from_file.value).split("Allowed keys: ")[1]
    )
    assert str(from_dict.value) == str(from_file.value).replace(str(path), api.DICT_SPACE)


def test_an_object_that_cannot_be_pickled_is_refused_in_one_line() -> None:
    lock = threading.Lock()

    def locked_net(num_classes: int) -> torch.nn.Module:
        with lock:
            return TinyNet(num_classes)

    with pytest.raises(UserError) as error:
        api.search({**SPACE, "task": "digits"}, model=locked_net)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "model=tests.search.test_api.test_an_object_that_cannot_be_pickled_is_refused_in_one_line.<locals>.locked_net"
    )
    assert "cannot be sent to Ray workers" in message and "pass it as model={'import': 'file.py:test_an_object" in message


def test_a_model_given_twice_is_refused() -> None:
    with pytest.raises(
        UserError,
        match=r"^<space dict>: model: names 'digits_cnn', and search\(\) was given model=examples.own_model.tiny_net.TinyNet; give the model once",
    ):
        api.search({**SPACE, "task": "digits", "model": "digits_cnn"}, model=TinyNet)


def test_the_object_names_differ_when_the_object_does(tmp_path: Path) -> None:
    """The name (and so the baseline cache key) covers the pickled object: other weights, another name."""
    from errors.user_code import python_object, user_object

    torch.manual_seed(0)
    first = python_object(TinyNet(width=4), "model")
    torch.manual_seed(1)
    second = python_object(TinyNet(width=4), "model")
    assert first != second and first.startswith("object:examples.own_model.tiny_net.TinyNet()@")
    described = user_object(python_object(TinyNet, "model")).describe()
    source = Path("examples/own_model/tiny_net.py").resolve()
    assert (described["module"], described["qualname"], described["source"]) == ("examples.own_model.tiny_net", "TinyNet", str(source))
    assert described["source_sha256"] == __import__("hashlib").sha256(source.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_search_of_python_objects_returns_its_front_and_exports_a_pick(tmp_path: Path, local_ray, capsys) -> None:
    results, tracking = tmp_path / "results", f"sqlite:///{tmp_path}/mlflow.db"
    task = DigitsTask(limit=600)
    result = api.search(
        {**SPACE, "model": {"options": {"width": 8}}}, model=TinyNet, task=task, results_dir=results, tracking_uri=tracking, log=_quiet
    )
    assert result.name == "api_search" and result.folder == (results / "api_search").resolve()
    assert len(result.rows) == 2 and 1 <= len(result.front) <= 2
    # The rows and their run ids are MLflow's.
    client = mlflow.tracking.MlflowClient(tracking)
    for row in result.rows:
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.run_name == row["trial"]
        assert run.data.metrics["accuracy"] == pytest.approx(row["accuracy"]) and run.data.metrics["macs"] == row["macs"]
        assert run.data.tags["is_pareto"] == str(row in result.front).lower()
        assert [step["name"] for step in row["recipe"]] == ["l1_filter"]
    assert result.baseline["accuracy"] > 0.5
    # The manifest and the recipe describe the objects.
    manifest = json.loads((result.folder / "search.json").read_text())
    assert "qualname: TinyNet" in manifest["space_yaml"] and "qualname: DigitsTask" in manifest["space_yaml"]

    out = api.load("api_search", results).export("max-accuracy", tmp_path / "export", form="program", log=_quiet)
    recipe = json.loads((out / "recipe.json").read_text())
    best = max(result.front, key=lambda row: row["accuracy"])
    assert recipe["mlflow_run_id"] == best["mlflow_run_id"] and recipe["metrics"]["accuracy"] == best["accuracy"]
    assert recipe["objects"]["model"]["qualname"] == "TinyNet" and recipe["objects"]["task"]["instance"] is True
    program = torch.export.load(out / "model.pt2").module()
    assert program(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # Where the objects are not (the command line, another process): the program exports, the module form says what to do.
    from errors import user_code
    from search.cli import main

    user_code._OBJECTS.clear()
    command = ["export", "api_search", "--pick", "knee", "--results-dir", str(results)]
    assert main([*command, "--form", "program", "--out", str(tmp_path / "cli_program")]) == 0
    assert (tmp_path / "cli_program" / "model.pt2").is_file()
    capsys.readouterr()
    assert main([*command, "--form", "module", "--out", str(tmp_path / "cli_module")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("slimtune: error: model 'object:examples.own_model.tiny_net.TinyNet@")
    assert "search.api.load(NAME, model=...)" in error and not (tmp_path / "cli_module").exists()
    # Resuming needs the objects too: without them, one line that says how; with them, the search as it was.
    with pytest.raises(UserError) as refused:
        api.resume("api_search", results, log=_quiet)
    assert (
        "\n" not in str(refused.value)
        and "Pass it again from Python" in str(refused.value)
        and "search.api.resume(NAME, " in str(refused.value)
    )
    resumed = api.resume("api_search", results, model=TinyNet, task=task, log=_quiet)
    assert [row["mlflow_run_id"] for row in resumed.rows] == [row["mlflow_run_id"] for row in result.rows]
    # The whole export, module form included, with the objects given again, registered under a name.
    full = api.load("api_search", results, model=TinyNet, task=task).export(
        best, tmp_path / "full", register="api-tiny", alias="best", log=_quiet
    )
    assert {"model.pt", "model.pt2", "model.onnx"} <= {p.name for p in full.iterdir()}
    version = client.get_model_version_by_alias("api-tiny", "best")
    assert version.run_id == best["mlflow_run_id"] and version.tags["slimtune.trial"] == best["trial"]


@pytest.mark.slow
def test_a_trained_module_instance_is_the_baseline(tmp_path: Path, local_ray) -> None:
    from torch.utils.data import DataLoader

    task = DigitsTask(limit=600)
    torch.manual_seed(0)
    trained = TinyNet(width=8)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(3):
        for x, y in DataLoader(task.train_set, batch_size=32, shuffle=False):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(trained(x), y).backward()
            optimizer.step()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    expected = task.evaluate(trained, DataLoader(task.test_set, batch_size=256), "cpu")["accuracy"]
    space = {k: v for k, v in SPACE.items() if k != "baseline"}
    result = api.search(
        {**space, "name": "api_trained"}, model=trained, task=task, results_dir=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=_quiet,
    )  # fmt: skip
    assert result.baseline["accuracy"] == pytest.approx(expected, abs=1e-9) and expected > 0.5
    # The user's module is untouched.
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
