"""Golden-graph tests: every ``fixtures/**/*.onnxtest`` case, checked for structure and numbers.

``pytest --update-goldens`` rewrites the expected sections with the actual output; review the
diff before committing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from graphopt.pipeline import PassRegistry
from graphopt.testing import assert_golden, collect_cases
from graphopt.testing.pytest_plugin import case_id

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CASES = collect_cases(FIXTURES)


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes (plugins left out, so an installed plugin cannot change a golden)."""
    return PassRegistry.default(plugins=False)


def test_fixtures_exist() -> None:
    """Every pass family has golden cases (guards against a moved fixtures folder)."""
    folders = {p.parent.name for p in CASES}
    assert {"eliminate-dead-code", "eliminate-identity", "dedup-initializers", "topo-sort"} <= folders


@pytest.mark.parametrize("path", CASES, ids=case_id(FIXTURES))
def test_golden(path: Path, registry: PassRegistry, update_goldens: bool) -> None:
    """Structure equals the expected section; numbers equal the input model's in onnxruntime."""
    assert_golden(path, registry=registry, update=update_goldens)
