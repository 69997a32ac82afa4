"""The ``slimtune`` command line, run in-process (and once as the installed console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from methods import Method, get_method, hyperparameters, list_methods
from search.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "spaces" / "quickstart.yaml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "slimtune"


@pytest.fixture
def bad_space(tmp_path: Path) -> Path:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["methods"] = {"l1_filtr": {}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_methods_lists_every_method(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert listed == list_methods()
    assert "ratio" in out and "fraction of output channels removed" in out


def test_methods_json_has_hyperparameters_with_defaults(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listing] == list_methods()
    for entry in listing:
        cls = get_method(entry["name"])
        assert entry["kind"] == cls.kind
        assert entry["must_be_last"] == cls.must_be_last
        expected = {h.name: h.default for h in hyperparameters(cls.Config)}
        assert {h["name"]: h["default"] for h in entry["hyperparameters"]} == expected
        assert all(h["help"] for h in entry["hyperparameters"])
    l1 = next(e for e in listing if e["name"] == "l1_filter")
    ratio = next(h for h in l1["hyperparameters"] if h["name"] == "ratio")
    assert ratio == {
        "name": "ratio", "type": "float", "optional": False, "choices": None, "default": 0.5,
        "help": "fraction of output channels removed from every prunable layer", "search": {"low": 0.1, "high": 0.8},
        "compresses": "high", "budget": False,
    }  # fmt: skip
    od = {h["name"]: h for h in next(e for e in listing if e["name"] == "od")["hyperparameters"]}
    assert (od["epochs"]["type"], od["epochs"]["optional"], od["epochs"]["default"], od["epochs"]["budget"]) == ("int", True, None, True)
    assert (od["conv"]["type"], od["conv"]["choices"], od["conv"]["compresses"]) == ("str", ["shift", "dw", "group"], "low")


def test_methods_summary_is_the_first_line_of_each_class_docstring(capsys) -> None:
    """vsd, vcd and vml share a module but not a summary."""
    assert main(["methods", "--json"]) == 0
    summaries = {entry["name"]: entry["summary"] for entry in json.loads(capsys.readouterr().out)}
    assert summaries == {name: get_method(name).__doc__.strip().splitlines()[0] for name in list_methods()}
    assert len({summaries["vsd"], summaries["vcd"], summaries["vml"]}) == 3


def test_methods_say_which_task_kinds_and_layers_each_method_applies_to(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    listing = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert (listing["kd"]["task_kinds"], listing["vcd"]["task_kinds"], listing["l1_filter"]["task_kinds"]) == (
        ["classification"],
        ["two_view"],
        None,
    )
    default = Method.applies_to
    assert {name for name, entry in listing.items() if entry["applies_to"] == default} == {"kd", "vcd", "vml"}  # the loss-only methods
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "    tasks: any; changes: output channels of Conv2d and Linear layers" in out
    assert "    tasks: two_view; changes: no layer (it changes how the model is trained)" in out


def test_methods_text_shows_types_choices_and_what_compresses(capsys) -> None:
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("    ") and "default" in line}
    assert lines["conv"].split()[1:4] == ["str", "default", '"dw"']
    assert "one of shift, dw, group; compresses more at shift;" in lines["conv"]
    assert lines["adversarial_epochs"].split()[1:6] == ["int", "|", "null", "default", "null"]
    assert "; a training budget;" in lines["adversarial_epochs"]
    assert "compresses more at the high end;" in lines["ratio"]


def test_profile_resnet56_matches_the_paper(capsys) -> None:
    assert main(["profile", "resnet56", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["input_shape"]) == ("cifar10", [3, 32, 32])
    assert report["macs"] == pytest.approx(125.49e6, rel=0.005)
    assert report["params"] == pytest.approx(0.85e6, rel=0.005)
    assert report["flops"] == 2 * report["macs"]
    assert report["size_bytes"] > 4 * report["params"]  # float32 weights plus batch-norm statistics
    assert report["bops"] == 32 * 32 * report["macs"]  # nothing quantized: every MAC is 32 x 32 bits
    # Timed as a trial times it: the exported program, at the stated thread count and batch.
    assert (report["latency_form"], report["latency_threads"], report["latency_batch_size"]) == ("program", 1, 1)
    assert 0 < report["artifact_bytes"] - report["size_bytes"] < report["size_bytes"]
    assert report["latency_ms"] > 0


def test_profile_counts_quantized_bops_and_times_the_program(capsys) -> None:
    assert main(["profile", "digits_cnn", "--method", "minmax_quant", "--method-option", "bits=4", "--threads", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 4-bit weights (and 4-bit inputs where the layer quantizes them) count 4 x 4 to 4 x 32 bits, not 32 x 32.
    assert report["macs"] * 4 * 4 <= report["bops"] < report["macs"] * 4 * 32
    assert (report["latency_form"], report["latency_threads"]) == ("program", 2)
    # Every form side by side, each with its file; the headline figures are the program's.
    assert list(report["forms"]) == ["program", "module", "onnx"]
    assert all(f["latency_ms"] > 0 and f["artifact_bytes"] > 0 for f in report["forms"].values())
    assert (report["latency_ms"], report["artifact_bytes"]) == tuple(
        report["forms"]["program"][k] for k in ("latency_ms", "artifact_bytes")
    )


def test_profile_prints_every_form_side_by_side(capsys) -> None:
    assert main(["profile", "digits_cnn"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["program"], ["module"], ["onnx"])]
    assert [(row[0], row[1], row[3], row[5]) for row in rows] == [
        ("program", "model.pt2", "ms", "bytes"),
        ("module", "model.pt", "ms", "bytes"),
        ("onnx", "model.onnx", "ms", "bytes"),
    ]


def test_profile_refuses_zero_threads_in_one_line(capsys) -> None:
    assert main(["profile", "digits_cnn", "--threads", "0"]) == 2
    assert capsys.readouterr().err == "slimtune: error: --threads must be at least 1, but got 0.\n"


# --form module: exporting a 60-step recurrent network takes tens of seconds; its figures do not need it.
GRU_512 = ["profile", "gru", "--task", "adding", "--model-option", "hidden_size=512", "--form", "module", "--json"]


def test_profile_gru_512_on_adding_matches_the_paper(capsys) -> None:
    # Wolter et al. 2020: the dense GRU-512 on the adding problem has 791,553 parameters.
    assert main([*GRU_512, "--task-option", "length=60"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["input_shape"], report["params"]) == ("adding", [60, 2], 791_553)
    # Each of 60 steps: three gates of 2x512 input and 512x512 hidden MACs; then the 512 -> 1 head.
    assert report["macs"] == 60 * 3 * (2 * 512 + 512 * 512) + 512
    assert report["model_options"] == {"hidden_size": 512} and report["task_options"] == {"length": 60}
    assert (report["latency_form"], report["artifact_bytes"]) == ("module", None)


def test_profile_gru_512_after_wavelet_state_matches_the_paper(capsys) -> None:
    # Wolter et al. 2020: wavelet-compressing the GRU-512's state matrix leaves 530,986 parameters.
    assert main([*GRU_512, "--method", "wavelet", "--method-option", "mode=state"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["input_shape"], report["params"]) == ([30, 2], 530_986)
    assert (report["method"], report["method_options"]) == ("wavelet", {"mode": "state"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method-option", "mode"], "--method-option takes KEY=VALUE, but got 'mode'"),
        (["--method-option", "mdoe=state"], "--method wavelet: method 'wavelet' has no hyperparameter 'mdoe'. Did you mean 'mode'?"),
    ],
)
def test_profile_bad_method_option_is_one_error_line(capsys, extra: list[str], message: str) -> None:
    assert main(["profile", "gru", "--task", "adding", "--method", "wavelet", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"slimtune: error: {message}")


def test_profile_method_that_does_not_apply_is_one_error_line(capsys) -> None:
    assert main(["profile", "digits_cnn", "--method", "wavelet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "slimtune: error: --method wavelet does not apply to digits_cnn on digits: wavelet found no"
    )


def test_check_quickstart_passes(capsys) -> None:
    assert main(["check", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert out.count("[ok  ]") == 4  # three methods alone, then the pipeline
    assert "all 4 pre-flight checks passed" in out


def test_check_bad_space_is_one_error_line(capsys, bad_space: Path) -> None:
    assert main(["check", str(bad_space)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"slimtune: error: {bad_space}: methods.l1_filtr: unknown method 'l1_filtr'. Did you mean 'l1_filter'")
    assert "Traceback" not in captured.err + captured.out


def test_console_script_exits_2_without_traceback(bad_space: Path) -> None:
    result = subprocess.run([str(CONSOLE_SCRIPT), "check", str(bad_space)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("slimtune: error: ")
    assert result.stderr.count("\n") == 1


def test_pareto_of_unknown_search_exits_2(capsys, tmp_path: Path) -> None:
    assert main(["pareto", "nosuch", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimtune: error: no search named 'nosuch'")
    assert f"There are no searches in {tmp_path}" in err
    assert len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Every user error is one line and exit 2, before anything is created; warnings reach stderr.
# ----------------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert lines[0].startswith("slimtune: error: ")
    return lines[0].removeprefix("slimtune: error: ")


BAD_OVERRIDES = [
    (["--trials", "0"], f"overrides of {QUICKSTART}: budget.trials: must be >= 1, but got 0."),
    (["--trials", "-2"], f"overrides of {QUICKSTART}: budget.trials: must be >= 1, but got -2."),
    (
        ["--tracking-uri", "mlruns"],
        f"overrides of {QUICKSTART}: output.tracking_uri: MLflow's file store (a folder path) is in maintenance mode",
    ),
    (["--name", "a/b"], f"overrides of {QUICKSTART}: name: may hold letters, digits"),
]
CASES = [(command, *case) for command in ("check", "search") for case in BAD_OVERRIDES]


@pytest.mark.parametrize(("command", "options", "says"), CASES)
def test_bad_overrides_are_one_line_and_leave_nothing(
    capsys, monkeypatch, tmp_path: Path, command: str, options: list[str], says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([command, str(QUICKSTART), *options]) == 2
    assert _one_error_line(capsys).startswith(says)
    assert list(tmp_path.iterdir()) == []


def test_check_refuses_an_unwritable_results_folder(capsys, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["check", str(QUICKSTART), "--results-dir", str(tmp_path / "file" / "r")]) == 2
    assert _one_error_line(capsys) == (
        f"results folder (--results-dir / output.results_dir) {tmp_path / 'file' / 'r'}: cannot be a folder, "
        f"since {tmp_path / 'file'} is a file. Choose another path."
    )


def test_check_refuses_gpu_trials_without_a_gpu(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("search.driver.checks.local_resources", lambda: [{"CPU": 2.0, "GPU": 0.0}])
    data = yaml.safe_load(QUICKSTART.read_text())
    data["budget"]["gpus_per_trial"] = 1
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path)]) == 2
    assert _one_error_line(capsys).startswith(
        f"{path}: budget.gpus_per_trial: each trial asks for 1 GPU, but the cluster has 2 CPUs and 0 GPUs;"
    )


def test_check_refuses_a_model_that_rejects_the_task_input(capsys, tmp_path: Path) -> None:
    path = tmp_path / "vit.yaml"
    path.write_text(
        yaml.safe_dump(
            {"task": "digits", "model": "vit_b_16", "methods": {"l1_filter": {}}, "objectives": {"accuracy": "max", "macs": "min"}}
        )
    )
    assert main(["check", str(path)]) == 2
    message = _one_error_line(capsys)
    assert message.startswith(f"{path}: model: 'vit_b_16' does not accept task 'digits' input of shape (2, 1, 8, 8)")


def test_check_prints_warnings_and_plurals(capsys, tmp_path: Path) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["methods"] = {"l1_filter": {}}
    data["objectives"] = {"accuracy": "min", "macs": "min"}
    data["constraints"] = ["accuracy <= 1.5"]
    path = tmp_path / "warn.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path), "--results-dir", str(tmp_path / "r"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{path}: digits / digits_cnn, 1 method, objectives accuracy, macs"
    assert captured.out.splitlines()[-1] == f"{path}: valid (1 pre-flight check passed)"
    warnings = captured.err.splitlines()
    assert [w.split(": ")[:3] for w in warnings] == [
        ["slimtune", "warning", str(path)],
        ["slimtune", "warning", str(path)],
    ]
    assert "objectives.accuracy: min minimises accuracy" in warnings[0]
    assert "constraints[0]: 'accuracy <= 1.5' always holds" in warnings[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warn.yaml"]


@pytest.mark.parametrize("command", ["check", "search"])
@pytest.mark.parametrize("constraint", ["accuracy >= 2.0", "macs <= -5"])
def test_an_impossible_constraint_is_one_line_and_leaves_nothing(
    capsys, monkeypatch, tmp_path: Path, command: str, constraint: str
) -> None:
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(QUICKSTART.read_text())
    data["constraints"] = [constraint]
    path = tmp_path / "impossible.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main([command, str(path)]) == 2
    assert _one_error_line(capsys).startswith(
        f"{path}: constraints[0]: '{constraint.replace('2.0', '2')}' never holds: no trial could be feasible"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["impossible.yaml"]


def test_export_into_an_unwritable_folder_is_one_line(capsys, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "export"
    assert main(["export", "any", "--pick", "knee", "--out", str(out), "--results-dir", str(tmp_path)]) == 2
    assert _one_error_line(capsys) == f"--out {out}: cannot be a folder, since {tmp_path / 'file'} is a file. Choose another path."


def test_search_refuses_a_method_that_fails_on_the_model_before_training(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sr.yaml"
    path.write_text(
        yaml.safe_dump({"task": "sr", "model": "edsr_small", "methods": {"l1_filter": {}}, "objectives": {"psnr": "max", "macs": "min"}})
    )
    assert main(["search", str(path)]) == 2
    assert _one_error_line(capsys).startswith(
        f"{path}: 1 of 1 pre-flight check failed, so the trials that use it would fail too: l1_filter: "
    )
    assert [p.name for p in tmp_path.iterdir()] == ["sr.yaml"]


@pytest.mark.slow
def test_search_refuses_gpu_trials_on_a_cluster_without_gpus_before_training(capsys, monkeypatch, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(QUICKSTART.read_text())
    data["budget"]["gpus_per_trial"] = 1
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path)]) == 2
    message = _one_error_line(capsys)
    assert message.startswith(f"{path}: budget.gpus_per_trial: each trial asks for 1 GPU, but the cluster has "), message
    assert "0 GPUs" in message
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.yaml"]


# ----------------------------------------------------------------------------------------------
# What the command line says is true.
# ----------------------------------------------------------------------------------------------


def test_profile_of_a_model_that_rejects_the_task_input_is_one_line(capsys) -> None:
    assert main(["profile", "gru", "--task", "digits"]) == 2
    assert _one_error_line(capsys).startswith("gru does not accept task 'digits' input of shape (1, 1, 8, 8) (RuntimeError: ")


def test_check_says_valid_only_after_every_check_passed(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("search.driver.checks.local_resources", lambda: [{"CPU": 2.0, "GPU": 0.0}])
    data = yaml.safe_load(QUICKSTART.read_text())
    data["budget"]["gpus_per_trial"] = 1
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    assert ": valid" not in captured.out and "[ok  ]" in captured.out
    assert "budget.gpus_per_trial" in captured.err


def test_a_method_without_parameters_shows_no_empty_brackets(capsys, tmp_path: Path) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["methods"] = {"kd": {"params": {}}, "minmax_quant": {"params": {"bits": 8}}}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path), "--results-dir", str(tmp_path / "r"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    checks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  [")]
    assert [line.split(":")[0] for line in checks] == [
        "  [ok  ] kd",
        "  [ok  ] minmax_quant (bits=8)",
        "  [ok  ] pipeline kd > minmax_quant",
    ]


@pytest.mark.parametrize(("command", "interrupted"), [
    (["export", "s", "--pick", "knee", "--out", "x"], "search.results.record.load_search"),
    (["check", str(QUICKSTART)], "search.space.spec.load_space"),
    (["profile", "digits_cnn"], "search.trial.profile.profiled_model"),
])  # fmt: skip
def test_ctrl_c_outside_a_search_hints_no_resume(capsys, monkeypatch, tmp_path: Path, command: list[str], interrupted: str) -> None:
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(interrupted, ctrl_c)
    assert main(command) == 130
    assert capsys.readouterr().err == "slimtune: interrupted.\n"


def test_ctrl_c_in_resume_hints_resume_with_the_search_name(capsys, monkeypatch) -> None:
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("search.driver.runner.resume_search", ctrl_c)
    assert main(["resume", "digits-7", "--results-dir", "r"]) == 130
    assert capsys.readouterr().err == "slimtune: interrupted; continue with: slimtune resume digits-7 --results-dir r.\n"


def test_pareto_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    from tests.search.test_unfinished_trials import _stored_search

    _stored_search(tmp_path, completed=True)
    command = [sys.executable, "-m", "search.cli", "pareto", "broken", "--json", "--results-dir", str(tmp_path / "results")]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    process.stdout.close()  # the reader is gone before the command writes (`| head` that has read enough)
    _, err = process.communicate(timeout=120)
    assert err.decode() == ""
    assert process.returncode == 141


def test_the_command_exits_without_collecting_every_object_it_imported(tmp_path: Path) -> None:
    """After a search Python's teardown ran the collector over torch's, MLflow's and Ray's objects
    for 1.5-3 s before the prompt came back; the command freezes them out of it first. The exit
    handlers still run and the output is whole."""
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print(f'frozen at exit: {gc.get_freeze_count() > 0}'))\n"
        "import search.cli\n"
        "sys.argv = ['slimtune', 'methods', '--json']\n"
        "search.cli.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    listing, _, frozen = done.stdout.rpartition("frozen at exit:")
    assert frozen.strip() == "True"
    assert [entry["name"] for entry in json.loads(listing)] == list_methods()
