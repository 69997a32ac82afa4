"""The installed libraries lie inside the ranges pyproject.toml declares (the ranges the code was checked with)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = [Requirement(text) for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=lambda r: r.name)
def test_installed_version_is_in_the_declared_range(requirement: Requirement) -> None:
    try:
        found = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed; pyproject.toml requires {requirement}. Run `make venv`.")
    assert requirement.specifier.contains(found, prereleases=True), (
        f"{requirement.name} {found} is installed, but pyproject.toml declares {requirement.name}{requirement.specifier}: "
        f"install a version in that range, or check the code against {found} and widen the range."
    )


def test_private_api_libraries_have_an_upper_bound() -> None:
    """search/driver/_private.py uses private Ray and Optuna APIs: a new release must be checked before it is allowed."""
    from search.driver._private import CHECKED_PACKAGES

    by_name = {r.name: r for r in REQUIREMENTS}
    for name in CHECKED_PACKAGES:
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in by_name[name].specifier), (
            f"{name} needs an upper bound, but is {by_name[name]}"
        )


def test_import_check_names_the_package_the_version_and_the_range(monkeypatch) -> None:
    from errors import UserError
    from search.driver import _private

    monkeypatch.setattr(_private.metadata, "requires", lambda name: ["ray[tune]>=2.44,<2.61", "optuna>=5.0,<6"])
    monkeypatch.setattr(_private.metadata, "version", lambda name: {"ray": "2.70.0", "optuna": "5.0.0"}[name])
    with pytest.raises(UserError, match=r"private APIs of ray checked with ray<2.61,>=2.44, but ray 2.70.0 is installed"):
        _private.check_versions()
    monkeypatch.setattr(_private.metadata, "version", lambda name: {"ray": "2.60.0", "optuna": "5.0.0"}[name])
    _private.check_versions()


def _lowest_constraints():
    """``.ci/lowest_constraints.py``, the script ``make lowest`` pins the lower bounds with."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lowest_constraints", ROOT / ".ci" / "lowest_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_lowest_pins_every_declared_lower_bound(capsys) -> None:
    assert _lowest_constraints().main([str(ROOT / "pyproject.toml")]) == 0
    pins = capsys.readouterr().out.split()
    declared = [
        *REQUIREMENTS,
        *(Requirement(t) for t in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]),
    ]
    expected = [f"{r.name}=={next(s.version for s in r.specifier if s.operator == '>=')}" for r in declared]
    assert pins == expected
    assert "torch==2.12" in pins and "ray==2.52" in pins  # extras (ray[tune]) dropped: pip refuses them in constraints


def test_a_dependency_without_a_lower_bound_is_refused(tmp_path, capsys) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.6,<3", "pyyaml"]\n')
    assert _lowest_constraints().main([str(pyproject)]) == 2
    err = capsys.readouterr().err
    assert "dependency 'pyyaml' needs exactly one '>=' lower bound" in err and str(pyproject) in err
