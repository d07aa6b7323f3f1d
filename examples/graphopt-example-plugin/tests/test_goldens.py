"""Golden cases of the plugin's passes, run through graphopt's harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphopt.pipeline import PassRegistry
from graphopt.testing import assert_golden, collect_cases
from graphopt.testing.pytest_plugin import case_id

import graphopt_example_plugin

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """graphopt's built-in passes plus this plugin's (whether or not it is installed)."""
    reg = PassRegistry.default(plugins=False)
    reg.load_module(graphopt_example_plugin)
    return reg


@pytest.mark.parametrize("path", collect_cases(FIXTURES), ids=case_id(FIXTURES))
def test_golden(path: Path, registry: PassRegistry, update_goldens: bool) -> None:
    """Each case's structure and numbers match."""
    assert_golden(path, registry=registry, update=update_goldens)
