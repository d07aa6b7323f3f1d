"""Suite-wide pytest configuration.

* ``--update-goldens`` and the ``update_goldens`` fixture come from
  :mod:`graphopt.testing.pytest_plugin`, the same support plugin authors use.
* Tests marked ``slow`` (minutes of run time, e.g. a graph of a million nodes) run only with
  ``--runslow``; the default run is the whole suite CI runs.
"""

from __future__ import annotations

from typing import Any

import pytest

from graphopt.testing.pytest_plugin import add_golden_options, update_goldens

__all__ = ["update_goldens"]


def pytest_addoption(parser: Any) -> None:
    """Register ``--update-goldens`` and ``--runslow``."""
    add_golden_options(parser)
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (minutes each)")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Skip ``slow`` tests unless ``--runslow`` is given."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
