"""Fixtures of the conformance tests: the backend suites, loaded once, and their baselines.

Each test loops over one suite and reports every failing case at once; the per-suite counts
(passed, failed, skipped by reason) are printed in pytest's terminal summary.
"""

from __future__ import annotations

from typing import Any

import pytest

from graphopt.pipeline import PassRegistry

from _conformance import (Case, Reference, Tally, baked_case, data_dir_cases, light_cases,
                          model_cases, node_cases, reference_of)

_TALLIES = pytest.StashKey[list]()


class SuiteStore:
    """Loads each suite on first use and caches onnxruntime's outputs on the original models."""

    def __init__(self, tallies: list[Tally]) -> None:
        self._cases: dict[str, list[Case]] = {}
        self._references: dict[str, Reference] = {}
        self._baked: list[tuple[Case, Case | str]] | None = None
        self._registry: PassRegistry | None = None
        self.tallies = tallies

    @property
    def registry(self) -> PassRegistry:
        """The default pass registry, built once (scanning plugin entry points is slow)."""
        if self._registry is None:
            self._registry = PassRegistry.default()
        return self._registry

    def cases(self, suite: str) -> list[Case]:
        """The cases of ``suite``: ``node``, ``model``, ``data`` or ``light``."""
        if suite not in self._cases:
            loaders = {"node": node_cases, "model": model_cases, "data": data_dir_cases,
                       "light": light_cases}
            self._cases[suite] = loaders[suite]()
        return self._cases[suite]

    def baked(self) -> list[tuple[Case, Case | str]]:
        """Each node case with its baked variant (or the reason it has none)."""
        if self._baked is None:
            self._baked = [(c, baked_case(c)) for c in self.cases("node")]
        return self._baked

    def reference(self, case: Case) -> Reference:
        """onnxruntime on the original model of ``case`` (computed once)."""
        ref = self._references.get(case.id)
        if ref is None:
            ref = self._references[case.id] = reference_of(case)
        return ref

    def tally(self, title: str, skip_label: str = "skipped") -> Tally:
        """A new tally, listed in the terminal summary."""
        t = Tally(title, skip_label)
        self.tallies.append(t)
        return t


@pytest.fixture(scope="session")
def suites(request: pytest.FixtureRequest) -> SuiteStore:
    """The backend suites of the installed onnx, shared by every conformance test."""
    import onnxruntime

    # Models onnxruntime refuses are counted as skipped; its error log would only be noise.
    onnxruntime.set_default_logger_severity(4)
    tallies: list[Tally] = []
    request.config.stash[_TALLIES] = tallies
    return SuiteStore(tallies)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the case counts of every conformance suite that ran."""
    tallies = config.stash.get(_TALLIES, [])
    if not tallies:
        return
    terminalreporter.section("onnx backend conformance")
    for t in tallies:
        terminalreporter.write_line(t.summary())
