"""Suite-wide pytest configuration: ``--update-goldens`` and the ``update_goldens`` fixture.

Both come from :mod:`graphopt.testing.pytest_plugin`, the same support plugin authors use.
"""

from __future__ import annotations

from typing import Any

from graphopt.testing.pytest_plugin import add_golden_options, update_goldens

__all__ = ["update_goldens"]


def pytest_addoption(parser: Any) -> None:
    """Register ``--update-goldens`` (rewrite golden expected sections in place)."""
    add_golden_options(parser)
