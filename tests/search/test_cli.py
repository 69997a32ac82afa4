"""The ``slimtune`` command line, run in-process (and once as the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from methods import get_method, hyperparameters, list_methods
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
    assert report["latency_ms"] > 0


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
