"""``sessionflow.__version__`` and ``sessionflow --version`` agree with pyproject.toml."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import sessionflow
from sessionflow.cli import main

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pyproject_version() -> str:
    tomllib: Any = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    with PYPROJECT.open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_version_is_pyprojects() -> None:
    assert sessionflow.__version__ == pyproject_version(), (
        "the installed metadata is stale: reinstall with pip install -e '.[test]'"
    )


def test_version_is_the_distributions() -> None:
    assert sessionflow.__version__ == importlib.metadata.version("sessionflow")


def test_cli_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"sessionflow {sessionflow.__version__}\n"
