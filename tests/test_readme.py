"""The README documents what the code registers: every method, the imagefolder options and their defaults."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

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
        if package.parts[0] in ("tests", "bench", "spaces") or ".venv" in package.parts:
            continue
        if f"{package.name}/" not in text:
            missing.append(f"package {package}/")
        for module in sorted(init.parent.glob("*.py")):
            named = package.parts[0] in ("deploy", "search", "models", "tasks") or module.name.startswith("_")
            if module.name != "__init__.py" and named and module.name not in text:
                missing.append(f"module {package}/{module.name}")
    assert not missing, "README's Layout does not name:\n" + "\n".join(missing)
