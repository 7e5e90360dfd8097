"""The dependency check that scripts/test.sh runs (deptry) really fails on an undeclared import.

Each case runs deptry on a copy of the project with one thing broken: a runtime dependency dropped
from pyproject.toml, a runtime module importing a package nobody declared (what `import click` did
when typer stopped depending on click), and one importing a test-only package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPTRY = Path(sys.executable).with_name("deptry")


def _copy_project(dest: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(ROOT / "relexd", dest / "relexd", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _deptry(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPTRY), ".", "--no-ansi"], cwd=project, capture_output=True, text=True, timeout=120
    )


def test_the_project_passes(tmp_path: Path) -> None:
    result = _deptry(_copy_project(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["structlog", "typer", "watchdog", "safetensors"])
def test_dropping_a_declared_dependency_fails(tmp_path: Path, package: str) -> None:
    project = _copy_project(tmp_path)
    pyproject = project / "pyproject.toml"
    text, n = re.subn(rf'^\s*"{package}[^"]*",\n', "", pyproject.read_text(), flags=re.M)
    assert n == 1, f"{package} is not a declared dependency any more"
    pyproject.write_text(text)
    result = _deptry(project)
    assert result.returncode != 0
    assert re.search(rf"DEP00[13] '{package}'", result.stderr), result.stderr


@pytest.mark.parametrize(("package", "rule"), [("click", "DEP00[13]"), ("pytest", "DEP004")])
def test_a_runtime_module_importing_an_undeclared_or_test_only_package_fails(
    tmp_path: Path, package: str, rule: str
) -> None:
    project = _copy_project(tmp_path)
    cli = project / "relexd" / "daemon" / "cli.py"
    cli.write_text(cli.read_text() + f"\nimport {package}  # noqa\n")
    result = _deptry(project)
    assert result.returncode != 0
    assert re.search(rf"{rule} '{package}'", result.stderr), result.stderr
