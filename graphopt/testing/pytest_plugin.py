"""pytest support for golden cases: the ``--update-goldens`` option and fixtures.

Use it from a ``conftest.py`` in either of two ways::

    # 1. as a plugin (in the rootdir conftest.py)
    pytest_plugins = ["graphopt.testing.pytest_plugin"]

    # 2. by importing the hook and fixture (works in any conftest.py)
    from graphopt.testing.pytest_plugin import pytest_addoption, update_goldens  # noqa: F401

Then::

    @pytest.mark.parametrize("path", collect_cases(FIXTURES), ids=case_id(FIXTURES))
    def test_golden(path, update_goldens):
        assert_golden(path, update=update_goldens)

``pytest --update-goldens`` rewrites the expected sections in place; review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

__all__ = ["pytest_addoption", "add_golden_options", "update_goldens", "case_id", "UPDATE_OPTION"]

#: The command-line flag that rewrites expected sections.
UPDATE_OPTION = "--update-goldens"


def add_golden_options(parser: Any) -> None:
    """Register ``--update-goldens`` (once, however many conftest files ask)."""
    try:
        parser.addoption(UPDATE_OPTION, action="store_true", default=False,
                         help="rewrite the EXPECTED sections of golden cases with the actual output")
    except ValueError:  # already registered by another conftest or plugin
        pass


def pytest_addoption(parser: Any) -> None:
    """pytest hook: register ``--update-goldens``."""
    add_golden_options(parser)


@pytest.fixture
def update_goldens(request: Any) -> bool:
    """True when pytest runs with ``--update-goldens``."""
    return bool(request.config.getoption(UPDATE_OPTION, default=False))


def case_id(root: str | os.PathLike[str]) -> Callable[[Any], str]:
    """An ``ids=`` function naming each case by its path under ``root``, without the suffix.

    Example:
        >>> case_id("fixtures")(Path("fixtures/topo-sort/unsorted.onnxtest"))
        'topo-sort/unsorted'
    """
    base = Path(root)

    def name(path: Any) -> str:
        p = Path(path)
        try:
            rel = p.relative_to(base)
        except ValueError:
            rel = Path(p.name)
        return rel.with_suffix("").as_posix()

    return name
