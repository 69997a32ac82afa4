"""The trial's measurement of the final model: cost at the task's input shape, cost reported by methods."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deploy import count_flops, record_checksum
from methods import get_method
from search.space.spec import load_space
from search.trial.body import TrialSpec, measure, run_pipeline, train_baseline
from tasks import Task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def space():
    """The quickstart with no training at all: the baseline is the initial model, phases are 0 epochs."""
    space = load_space(ROOT / "spaces" / "quickstart.yaml")
    return space.with_overrides(baseline_epochs=0, budget=dataclasses.replace(space.budget, epochs=0), latency_repeats=1)


class _LastStepLSTM(nn.Module):
    """Classifies a ``(B, T, 5)`` sequence from the LSTM's last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _sequence_task(steps: int) -> Task:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, steps, 5, generator=generator), torch.arange(6) % 3)
    return Task(name="sequences", num_classes=3, input_shape=(steps, 5), train_set=data, val_set=data, test_set=data)


@pytest.mark.parametrize("steps", [4, 9])
def test_trial_measures_cost_at_the_tasks_sequence_length(space, steps: int) -> None:
    metrics = measure(_LastStepLSTM(), space, _sequence_task(steps), torch.device("cpu"), baseline=None)
    # 4*7*(5+7) MACs per time step, then the 7x3 head once.
    assert metrics["macs"] == steps * 336 + 21
    assert metrics["flops"] == 2 * metrics["macs"]


def test_a_methods_reported_cost_becomes_the_trials_macs(space, tmp_path: Path, monkeypatch) -> None:
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    spec = TrialSpec(space, baseline.state_dict(), baseline_metrics)
    seen_val_examples = []

    def gated_cost(self, model: nn.Module, ctx) -> dict[str, float]:
        # A gated net's expected MACs: here, half of what the counter sees, after a pass over the val data.
        seen_val_examples.append(sum(len(targets) for _, targets in ctx.val_loader))
        return {"macs": count_flops(model, ctx.example_input).macs / 2}

    monkeypatch.setattr(get_method("minmax_quant"), "cost", gated_cost)
    metrics = run_pipeline(spec, [{"name": "minmax_quant", "params": {"bits": 8}}], tmp_path, torch.device("cpu"), seed=0)
    measured = baseline_metrics["macs"]  # quantization keeps the layer shapes, so the counter sees the baseline's MACs
    assert measured > 0
    assert (metrics["macs"], metrics["flops"]) == (measured / 2, measured)
    assert (metrics["measured_macs"], metrics["measured_flops"]) == (measured, 2 * measured)
    assert seen_val_examples == [360]  # the trial's validation split of digits


def test_a_pipeline_that_reports_nothing_keeps_the_measured_cost(space, tmp_path: Path) -> None:
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    spec = TrialSpec(space, baseline.state_dict(), baseline_metrics)
    metrics = run_pipeline(spec, [{"name": "minmax_quant", "params": {"bits": 8}}], tmp_path, torch.device("cpu"), seed=0)
    assert metrics["macs"] == baseline_metrics["macs"] and "measured_macs" not in metrics


def test_method_artifacts_are_written_next_to_the_exported_model(space, tmp_path: Path) -> None:
    """decouple writes its report through Method.artifacts; its dynamic form's expected MACs become the trial's."""
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    spec = TrialSpec(space, baseline.state_dict(), baseline_metrics)
    metrics = run_pipeline(spec, [{"name": "decouple", "params": {"form": "dynamic"}}], tmp_path, torch.device("cpu"), seed=0)
    report = tmp_path / "artifacts" / "decouple"
    assert sorted(p.name for p in report.iterdir()) == ["fgsm.png", "paths.png", "report.html"]
    assert metrics["macs"] == metrics["decouple.dynamic_macs"] and "measured_macs" in metrics


def test_baseline_and_trial_latency_are_timed_alike_on_the_exported_program(space, tmp_path: Path, monkeypatch) -> None:
    """Both at budget.cpus_per_trial threads (the driver runs at another count), batch and form recorded."""
    import deploy._export
    from search.results.report import latency_note

    space = space.with_overrides(budget=dataclasses.replace(space.budget, cpus_per_trial=2.0), latency_batch_size=3)
    timed = []

    def spy(model, x, repeats, threads):
        timed.append((type(model).__name__, tuple(x.shape), threads))
        return 1.0

    monkeypatch.setattr(deploy._export, "latency_ms", spy)
    assert torch.get_num_threads() == 1  # tests run at one thread, as the driver runs at its own default
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    metrics = run_pipeline(TrialSpec(space, baseline.state_dict(), baseline_metrics), [], tmp_path, torch.device("cpu"), seed=0)
    for figures in (baseline_metrics, metrics):
        assert (figures["latency_threads"], figures["latency_batch_size"], figures["latency_form"], figures["latency_device"]) == (
            2.0,
            3.0,
            "program",
            "cpu",
        )
        assert latency_note(figures) == "program, batch 3, 2 CPU threads, cpu"  # printed with the baseline and the table
    # Both timed the exported program (a torch.export graph module), never the eager model.
    assert [(name.startswith("GraphModule"), shape, threads) for name, shape, threads in timed] == [(True, (3, 1, 8, 8), 2)] * 2


def test_the_close_out_traces_saves_and_loads_the_program_once_and_times_the_checked_program(space, tmp_path: Path, monkeypatch) -> None:
    """One ``torch.export.export``, one save, one load per close-out (it was two traces and two loads).

    The batch norms to fold are found by an eager pass, not a second trace, and the program
    loaded for the round-trip check is the one timed.
    """
    import deploy._export
    import deploy._loading

    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    calls = {"export": 0, "save": 0, "load": 0}
    for name in calls:
        real = getattr(torch.export, name)

        def counted(*args, real=real, name=name, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.export, name, counted)
    loaded, timed = [], []
    real_load_program = deploy._export.load_program
    monkeypatch.setattr(deploy._export, "load_program", lambda *a, **k: loaded.append(real_load_program(*a, **k)) or loaded[-1])
    monkeypatch.setattr(deploy._export, "latency_ms", lambda model, x, repeats, threads: timed.append(model) or 1.0)
    spec = TrialSpec(space, baseline.state_dict(), baseline_metrics)
    run_pipeline(spec, [{"name": "l1_filter", "params": {"ratio": 0.5}}], tmp_path, torch.device("cpu"), seed=0)
    assert calls == {"export": 1, "save": 1, "load": 1}
    assert len(loaded) == 1 and timed == loaded


def test_onnxruntime_times_the_trials_and_the_baselines_model_onnx_at_their_threads(space, tmp_path: Path, monkeypatch) -> None:
    """``measure.latency_runtime: onnxruntime``: model.onnx written and timed in ONNX Runtime, the program's file size kept beside it."""
    import deploy._export

    space = space.with_overrides(budget=dataclasses.replace(space.budget, cpus_per_trial=2.0), latency_runtime="onnxruntime")
    timed = []

    def spy(model, x, repeats, threads):
        timed.append((model.session.get_session_options().intra_op_num_threads, tuple(x.shape), threads))
        return 1.0

    monkeypatch.setattr(deploy._export, "latency_ms", spy)
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    metrics = run_pipeline(TrialSpec(space, baseline.state_dict(), baseline_metrics), [], tmp_path, torch.device("cpu"), seed=0)
    for figures in (baseline_metrics, metrics):
        assert (figures["latency_form"], figures["latency_threads"]) == ("onnx", 2.0)
        assert figures["artifact_bytes"] == figures["artifact_bytes_onnx"] != figures["artifact_bytes_program"]
    assert metrics["artifact_bytes_onnx"] == (tmp_path / "model.onnx").stat().st_size
    # Both timed an ONNX Runtime session made with the trial's threads, not torch's.
    assert timed == [(2, (1, 1, 8, 8), 2)] * 2


def test_the_program_runtime_writes_no_onnx_file(space, tmp_path: Path) -> None:
    """The dynamo exporter costs seconds per trial: only a search timed in ONNX Runtime pays it."""
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    metrics = run_pipeline(TrialSpec(space, baseline.state_dict(), baseline_metrics), [], tmp_path, torch.device("cpu"), seed=0)
    assert not (tmp_path / "model.onnx").exists() and "artifact_bytes_onnx" not in metrics
    assert metrics["artifact_bytes"] == metrics["artifact_bytes_program"] == (tmp_path / "model.pt2").stat().st_size


# -- results that cannot be trusted -------------------------------------------------------------


def test_a_baseline_at_chance_is_refused_with_what_chance_is_and_what_to_change() -> None:
    from pathlib import Path

    from errors import UserError
    from search.space.spec import load_space
    from search.trial.body import chance_accuracy, chance_margin, refuse_chance_baseline
    from search.trial.context import load_task

    space = load_space(Path(__file__).resolve().parents[2] / "spaces" / "quickstart.yaml")
    task = load_task(space)
    labels = task.test_set.tensors[1]
    # Digits' test split is stratified: its most frequent class is a little above 1/10.
    assert chance_accuracy(task) == pytest.approx(max(0.1, labels.bincount().max().item() / len(labels)))
    chance = chance_accuracy(task)
    margin = chance_margin(chance, len(labels))
    assert margin == pytest.approx(2 * (chance * (1 - chance) / len(labels)) ** 0.5)
    with pytest.raises(
        UserError,
        match=r"scores accuracy 0\.1000 on digits: at chance .*train it longer \(baseline\.epochs, now 15\), change training\.lr \(now 0\.05\)",
    ):
        refuse_chance_baseline(space, {"accuracy": 0.1, "chance_accuracy": chance, "chance_margin": margin})
    refuse_chance_baseline(space, {"accuracy": chance + margin + 0.01, "chance_accuracy": chance, "chance_margin": margin})
    # A task without accuracy (super-resolution) has no chance level: nothing is refused.
    refuse_chance_baseline(space, {"psnr": 10.0})


def test_a_diverged_trial_or_one_at_chance_is_marked_and_never_on_the_front() -> None:
    from search.results.ranking import front, pareto_table, rank_records
    from search.results.record import SearchRecord, TrialRecord
    from search.space.objectives import Objective
    from search.trial.body import trial_quality

    baseline = {"accuracy": 0.97, "chance_accuracy": 0.1, "chance_margin": 0.03}
    # digits_ssr's ssr > kd: train loss 3.15 -> 199.
    assert trial_quality({"accuracy": 0.6}, baseline, [3.15, 40.0, 199.0]) == "diverged"
    # minmax_quant(bits=2) at 0.1000.
    assert trial_quality({"accuracy": 0.1}, baseline, [2.3, 2.3, 2.3]) == "at chance"
    assert trial_quality({"accuracy": 0.9}, baseline, [0.5, 0.2, 0.3]) == "ok"
    record = SearchRecord(
        name="q", folder=None, space_yaml="", space_path="q.yaml", trials=3, objectives=(Objective("accuracy", "max"), Objective("macs", "min")),
        constraints=(), task_metrics=("accuracy", "macs"), tracking_uri="sqlite:///unused.db", optuna_storage="sqlite:///unused.db", baseline_metrics=baseline,
    )  # fmt: skip
    good = TrialRecord(0, "t0", None, [], {"accuracy": 0.9, "macs": 500.0, "diverged": 0.0, "at_chance": 0.0}, None)
    chance = TrialRecord(1, "t1", None, [], {"accuracy": 0.1, "macs": 10.0, "diverged": 0.0, "at_chance": 1.0}, None)
    diverged = TrialRecord(2, "t2", None, [], {"accuracy": 0.95, "macs": 400.0, "diverged": 1.0, "at_chance": 0.0}, None)
    records = [good, chance, diverged]
    rank_records(record, records)
    assert front(records) == [good]
    assert {row["trial"]: row.get("quality") for row in pareto_table(record, records, only_front=False)} == {
        "trial_000": None,
        "trial_001": "at chance",
        "trial_002": "diverged",
    }


def test_a_retried_trial_carries_its_cpu_seconds_over(space, tmp_path: Path, monkeypatch) -> None:
    """Tune retries a trial from its last epoch's checkpoint: its ``cpu_s`` goes on from the
    seconds that checkpoint recorded, in every report and in the next checkpoint, not from zero."""
    import contextlib
    import json
    import shutil
    import types

    from search.trial import body

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    torch.save({"epoch": 3}, earlier / "state.pt")
    record_checksum(earlier / "state.pt")
    (earlier / body.CPU_FILE).write_text(json.dumps({"cpu_s": 1000.0}))
    reports: list[tuple[dict, Path]] = []

    class Checkpoint:
        def __init__(self, directory: Path) -> None:
            self.directory = directory

        @classmethod
        def from_directory(cls, directory: str) -> Checkpoint:
            kept = tmp_path / f"reported{len(reports)}"
            shutil.copytree(directory, kept)  # Tune copies the folder before the trial removes it
            return cls(kept)

        @contextlib.contextmanager
        def as_directory(self):
            yield str(self.directory)

    def report(metrics: dict, checkpoint: Checkpoint) -> None:
        reports.append((metrics, checkpoint.directory))

    def fake_pipeline(spec, recipe, out_dir, device, seed, on_epoch_end=None, resume=None, log=None):
        assert resume == {"epoch": 3}
        on_epoch_end(resume, {"val_accuracy": 0.5})
        return {"accuracy": 0.5}

    monkeypatch.setattr(
        body, "tune", types.SimpleNamespace(get_checkpoint=lambda: Checkpoint(earlier), report=report, Checkpoint=Checkpoint)
    )
    monkeypatch.setattr(body, "ray", types.SimpleNamespace(get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "node")))
    monkeypatch.setattr(body, "run_pipeline", fake_pipeline)
    body.run_trial({}, TrialSpec(space, {}, {"accuracy": 0.6}))

    (epoch, epoch_dir), (final, _) = reports
    assert 1000.0 <= epoch["cpu_s"] <= final["cpu_s"] < 1000.0 + 60.0
    assert final["final"] is True
    assert json.loads((epoch_dir / body.CPU_FILE).read_text())["cpu_s"] == epoch["cpu_s"]


def test_a_retried_trial_refuses_a_state_pt_changed_since_it_was_written(space, tmp_path: Path, monkeypatch) -> None:
    """``state.pt`` is a pickle: a retry unpickles it only when its checksum is the one the trial recorded."""
    import contextlib
    import types

    from errors import UserError
    from search.trial import body

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    torch.save({"epoch": 3}, earlier / "state.pt")
    record_checksum(earlier / "state.pt")
    torch.save({"epoch": 4}, earlier / "state.pt")

    class Checkpoint:
        @contextlib.contextmanager
        def as_directory(self):
            yield str(earlier)

    monkeypatch.setattr(body, "tune", types.SimpleNamespace(get_checkpoint=lambda: Checkpoint()))
    with pytest.raises(UserError, match=r"state.pt: SHA-256 .* differs from the .* slimtune recorded in .*checksums.json"):
        body.run_trial({}, TrialSpec(space, {}, {"accuracy": 0.6}))
