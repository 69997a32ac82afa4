"""Every documented value of every key that chooses behaviour runs end to end through the real driver.

A few tiny searches (2 trials, 1 epoch) through ``search.driver.runner.run_search`` (Ray, Tune,
Optuna, MLflow) share one Ray instance; together they use each sampler, scheduler, optimizer and
task kind, and the export and the profile use each export and latency form. The coverage test
reads the lists from the code's constants, so a new value fails it until a search here uses it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from deploy import DEFAULT_LATENCY_RUNTIME, FORMS, LATENCY_RUNTIMES
from search.space.spec import OPTIMIZERS, SAMPLERS, SCHEDULERS
from tasks import TASK_KINDS, task_kind

#: The searches: what each one chooses, and its space's task, model, methods and objectives.
SEARCHES = {
    "opt_digits": {
        "sampler": "nsga2",
        "scheduler": "asha",
        "optimizer": "sgd",
        "latency_runtime": "onnxruntime",
        "body": """
task: digits
model: digits_cnn
training: {batch_size: 32, lr: 0.05}
methods:
  l1_filter: {optional: false, params: {ratio: {low: 0.2, high: 0.7}}}
objectives: {accuracy: max, macs: min}
""",
    },
    "opt_sr": {
        "sampler": "gp",
        "scheduler": "fifo",
        "optimizer": "adam",
        "body": """
task: {name: sr, options: {scale: 2, patch_size: 16, patches_per_epoch: 32}}
model: edsr_small
training: {batch_size: 16, lr: 0.001, weight_decay: 0.0}
methods:
  minmax_quant: {optional: false, params: {bits: {choices: [4, 8]}, quantize_activations: false}}
objectives: {psnr: max, size_bytes: min}
""",
    },
    "opt_adding": {
        "sampler": "random",
        "scheduler": "mo_asha",
        "optimizer": "adam",
        "body": """
task: {name: adding, options: {length: 8, train_size: 1024, val_size: 64, test_size: 64}}
model: {name: gru, options: {hidden_size: 8}}
training: {batch_size: 16, lr: 0.01, weight_decay: 0.0}
methods:
  minmax_quant: {optional: false, params: {bits: {choices: [4, 8]}}}
objectives: {mse: min, size_bytes: min}
""",
    },
    "opt_copy": {
        "sampler": "tpe",
        "scheduler": "fifo",
        "optimizer": "adam",
        "body": """
task: {name: copy_memory, options: {delay: 2, length: 3, train_size: 1024, val_size: 64, test_size: 256}}
model: {name: lstm, options: {hidden_size: 32}}
baseline: {epochs: 3}
training: {batch_size: 16, lr: 0.02, weight_decay: 0.0}
methods:
  minmax_quant: {optional: false, params: {bits: {choices: [4, 8]}}}
objectives: {accuracy: max, size_bytes: min}
""",
    },
    "opt_2view": {
        "sampler": "tpe",
        "scheduler": "fifo",
        "optimizer": "sgd",
        "body": """
task: digits_2view
model: {name: two_branch_digits, options: {width: 32, bottleneck: 8}}
baseline: {epochs: 3}
training: {batch_size: 32, lr: 0.05}
methods:
  vsd: {optional: false, params: {bottleneck: {choices: [4, 8]}}}
objectives: {rank1: max, macs: min}
""",
    },
}

#: The values of ``slimtune profile --form``, the forms a ``latency_ms`` can be timed on.
LATENCY_FORMS = ("program", "module")


def _runtime(spec: dict) -> str:
    return spec.get("latency_runtime", DEFAULT_LATENCY_RUNTIME)


def _space(name: str, spec: dict, tmp: Path) -> str:
    import yaml

    body = yaml.safe_load(spec["body"])
    body["training"]["optimizer"] = spec["optimizer"]
    baseline = {"epochs": 1, **body.pop("baseline", {})}
    return yaml.safe_dump(
        {
            "name": name,
            **body,
            "baseline": baseline,
            "budget": {"trials": 2, "concurrent": 1, "epochs": 1, "cpus_per_trial": 1, "scheduler": spec["scheduler"], "grace_epochs": 1},
            "sampler": {"name": spec["sampler"], "seed": 0},
            "measure": {"latency_repeats": 2, "latency_runtime": _runtime(spec)},
            "output": {"results_dir": str(tmp / "results"), "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
        },
        sort_keys=False,
    )


def test_every_documented_value_is_used_by_a_search_here() -> None:
    import yaml

    from search.cli import _parser

    chosen = {key: {spec[key] for spec in SEARCHES.values()} for key in ("sampler", "scheduler", "optimizer")}
    assert chosen == {"sampler": set(SAMPLERS), "scheduler": set(SCHEDULERS), "optimizer": set(OPTIMIZERS)}
    assert {_runtime(spec) for spec in SEARCHES.values()} == set(LATENCY_RUNTIMES)
    tasks = {
        spec_task["name"] if isinstance(spec_task, dict) else spec_task
        for spec_task in (yaml.safe_load(s["body"])["task"] for s in SEARCHES.values())
    }
    assert {task_kind(t) for t in tasks} == set(TASK_KINDS)
    # Every export form: test_export_writes_and_times_every_form asks for each one of FORMS.
    profile = next(a for a in _parser()._subparsers._group_actions[0].choices["profile"]._actions if a.dest == "form")
    assert set(profile.choices) == set(LATENCY_FORMS)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray on 127.0.0.1 for every search of this module, started as the driver starts it."""
    import ray

    from search.driver.runner import _init_ray

    assert not ray.is_initialized(), "another test left Ray running"
    assert _init_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def searches(shared_ray, tmp_path_factory):
    import ray

    from search.driver.runner import run_search

    tmp = tmp_path_factory.mktemp("options")
    done = {}
    for name, spec in SEARCHES.items():
        space = tmp / f"{name}.yaml"
        space.write_text(_space(name, spec, tmp))
        lines: list[str] = []
        with contextlib.redirect_stdout(io.StringIO()):
            done[name] = run_search(space, log=lines.append)
        assert ray.is_initialized(), f"search {name} shut down a Ray it did not start"
    return tmp, done


@pytest.mark.slow
@pytest.mark.parametrize("name", SEARCHES)
def test_each_search_completes_both_trials_with_its_choices(searches, name: str) -> None:
    from mlflow.tracking import MlflowClient

    from search.results.record import completed_records, load_search, search_progress

    tmp, done = searches
    spec = SEARCHES[name]
    record = load_search(name, tmp / "results")
    assert record.parent_run_id == done[name].parent_run_id
    assert (record.space.sampler, record.space.budget.scheduler, record.space.optimizer) == (
        spec["sampler"],
        spec["scheduler"],
        spec["optimizer"],
    )
    progress = search_progress(record)
    assert (progress.completed, progress.budget) == (2, 2)
    for trial in completed_records(record):
        assert all(math.isfinite(trial.metrics[o.metric]) for o in record.objectives), trial.metrics
        assert trial.metrics["latency_ms"] > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    parent = client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sampler"] == spec["sampler"]
    children = client.search_runs([parent.info.experiment_id], filter_string="tags.`slimtune.role` = 'trial'")
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    # Timed in the runtime the space names; with onnxruntime the trial wrote model.onnx and timed it.
    assert record.space.latency_runtime == _runtime(spec)
    assert {c.data.tags["latency_form"] for c in children} == {LATENCY_RUNTIMES[_runtime(spec)]}
    for trial in completed_records(record):
        assert trial.metrics["artifact_bytes"] == trial.metrics[f"artifact_bytes_{LATENCY_RUNTIMES[_runtime(spec)]}"] > 0
        assert ("artifact_bytes_onnx" in trial.metrics) == (_runtime(spec) == "onnxruntime")
    # The Pareto trials' models are logged in MLflow: the program, and the ONNX model where the trial wrote one.
    logged = client.search_logged_models([parent.info.experiment_id])
    programs = {m.source_run_id for m in logged if m.name == "program"}
    assert programs and programs <= {c.info.run_id for c in children}
    assert {m.source_run_id for m in logged if m.name == "onnx"} == (programs if _runtime(spec) == "onnxruntime" else set())


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_and_the_same_command_then_runs(searches, monkeypatch) -> None:
    from search.cli import main

    tmp, _ = searches
    out = tmp / "new" / "export"
    command = ["export", "opt_sr", "--pick", "max-psnr", "--out", str(out), "--results-dir", str(tmp / "results")]

    def broken(*args, **kwargs):
        raise RuntimeError("the reloaded program differs")

    monkeypatch.setattr("search.results.export.check_round_trip", broken)
    with pytest.raises(RuntimeError), contextlib.redirect_stdout(io.StringIO()):
        main(command)
    assert not (tmp / "new").exists()
    monkeypatch.undo()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(command) == 0
    assert "; reloaded program and onnx match the module (max diff" in stdout.getvalue()


@pytest.mark.slow
def test_report_register_and_resume_keep_the_search_run_s_end_time(searches) -> None:
    from mlflow.tracking import MlflowClient

    from search.cli import main
    from search.driver.runner import resume_search

    tmp, done = searches
    record = done["opt_2view"]
    client = MlflowClient(tracking_uri=record.tracking_uri)
    ended = client.get_run(record.parent_run_id).info
    results = str(tmp / "results")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", "opt_2view", "--results-dir", results]) == 0
        assert (
            main(
                [
                    "export",
                    "opt_2view",
                    "--pick",
                    "max-rank1",
                    "--register",
                    "two-view",
                    "--out",
                    str(tmp / "reg"),
                    "--results-dir",
                    results,
                ]
            )
            == 0
        )
        resume_search("opt_2view", results_dir=results, log=lambda line: None)
    after = client.get_run(record.parent_run_id).info
    assert (after.status, after.start_time, after.end_time) == ("FINISHED", ended.start_time, ended.end_time)


@pytest.mark.slow
def test_export_writes_and_times_every_form(searches) -> None:
    from search.cli import main

    tmp, _ = searches
    out = tmp / "export"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", "opt_digits", "--pick", "knee", "--out", str(out), "--compile", "--results-dir", str(tmp / "results")])
    assert code == 0, stdout.getvalue()
    assert {form for form, file in FORMS.items() if (out / file).is_file()} == set(FORMS)
    latency = json.loads((out / "recipe.json").read_text())["export_latency"]["ms"]
    assert set(latency) == set(FORMS) and all(latency[form] > 0 for form in FORMS)
    # opt_digits times latency_ms in ONNX Runtime: the export says so beside that form.
    assert "model.onnx" in next(line for line in stdout.getvalue().splitlines() if "what the trial's latency_ms timed" in line)


@pytest.mark.parametrize("form", LATENCY_FORMS)
def test_profile_times_each_latency_form(form: str) -> None:
    from search.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["profile", "digits_cnn", "--task", "digits", "--form", form, "--json"]) == 0
    report = json.loads(stdout.getvalue())
    assert report["latency_form"] == form and report["latency_ms"] > 0
