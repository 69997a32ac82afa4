"""The README documents what the code registers: every method, the imagefolder options and their defaults."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from methods import list_methods
from tasks import task_factory

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_methods_section_describes_every_registered_method() -> None:
    described = re.findall(r"^- \*\*`([a-z0-9_]+)`\*\*", _section("Methods"), flags=re.M)
    assert sorted(described) == list_methods()


def test_imagefolder_layout_and_option_defaults_match_the_task() -> None:
    section = _section("Space files")
    text = section[section.index("`imagefolder` reads") :]
    assert "root/train/<class>/" in text and "root/val/<class>/" in text
    defaults = {name: p.default for name, p in inspect.signature(task_factory("imagefolder")).parameters.items()}
    for option in ("train_dir", "val_dir", "image_size", "resize", "val_fraction", "seed"):
        written = re.search(rf"`{option}` \(`?([^):`]+)", text)
        assert written, f"README does not document imagefolder option {option}"
        assert written.group(1) == str(defaults[option]), option


def test_layout_names_every_package_and_module_group() -> None:
    """The Layout block names every package (``name/``) and every module of deploy, search and methods' private parts."""
    block = re.search(r"^## Layout\n\n```\n(.*?)```", README, flags=re.S | re.M)
    assert block, "README has no ```-block under '## Layout'"
    text = block.group(1)
    root = Path(__file__).resolve().parents[1]
    missing = []
    for init in sorted(root.glob("*/**/__init__.py")):
        package = init.parent.relative_to(root)
        # Hidden folders hold virtual environments (.venv, make lowest's .venv-lowest), not slimtune.
        if package.parts[0] in ("tests", "bench", "spaces") or package.parts[0].startswith("."):
            continue
        if f"{package.name}/" not in text:
            missing.append(f"package {package}/")
        for module in sorted(init.parent.glob("*.py")):
            named = package.parts[0] in ("deploy", "search", "models", "tasks") or module.name.startswith("_")
            if module.name != "__init__.py" and named and module.name not in text:
                missing.append(f"module {package}/{module.name}")
    assert not missing, "README's Layout does not name:\n" + "\n".join(missing)


OWN_MODEL = Path(__file__).resolve().parents[1] / "examples" / "own_model"


def test_own_model_section_shows_the_example_files_as_they_are() -> None:
    section = _section("Compress your own model")
    # The files, before the "From Python" part (tested as written below).
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", section.split("### From Python")[0], flags=re.S)
    assert blocks == [(OWN_MODEL / name).read_text() for name in ("tiny_net.py", "digits_task.py", "space.yaml")]


@pytest.mark.slow
def test_own_model_commands_run_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """The section's commands, from a folder holding a copy of examples/own_model: check, search, export, replay."""
    import json
    import shlex
    import shutil

    from search.cli import main

    shutil.copytree(OWN_MODEL, tmp_path / "examples" / "own_model")
    monkeypatch.chdir(tmp_path)
    block = re.search(r"```bash\n(.*?)```", _section("Compress your own model"), flags=re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["slimtune", "check"], ["slimtune", "search"], ["slimtune", "export"], ["slimtune", "replay"]]
    for command in commands:
        assert main(command[1:]) == 0, command
    recipe = json.loads((tmp_path / "own_export" / "recipe.json").read_text())
    assert recipe["imports"]["model"]["ref"] == f"{tmp_path / 'examples' / 'own_model' / 'tiny_net.py'}:TinyNet"
    assert "metrics equal the recipe's" in capsys.readouterr().out


@pytest.mark.slow
def test_own_model_from_python_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """The "From Python" block, run as a script would run it: a search of Python objects, its front printed, the knee exported."""
    import json

    block = re.search(r"### From Python\n.*?```python\n(.*?)```", _section("Compress your own model"), flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    printed = capsys.readouterr().out
    assert result.front and all(row["mlflow_run_id"] in printed for row in result.front)
    recipe = json.loads((tmp_path / "own_py_export" / "recipe.json").read_text())
    assert recipe["objects"]["model"]["qualname"] == "TinyNet" and recipe["trial"] in {row["trial"] for row in result.front}
