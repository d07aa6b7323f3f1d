"""Golden-test support from graphopt: ``--update-goldens`` and the ``update_goldens`` fixture."""

from __future__ import annotations

from graphopt.testing.pytest_plugin import pytest_addoption, update_goldens  # noqa: F401
