"""The golden-test harness, for graphopt's own passes and for plugin authors.

A case is one ``.onnxtest`` file: a ``# PIPELINE:`` header, an input model and the expected
output in ONNX text syntax (see :mod:`graphopt.testing._golden` for the format). Running a case
checks the structure (canonical text), the numbers (onnxruntime, optimizations off, seeded
inputs) and validity (``ir.verify``, ``onnx.checker``, unchanged signature).

Example:
    >>> from graphopt.testing import assert_golden, collect_cases
    >>> for path in collect_cases("fixtures"):  # doctest: +SKIP
    ...     assert_golden(path)

For pytest, see :mod:`graphopt.testing.pytest_plugin` (``--update-goldens``).
"""

from __future__ import annotations

from graphopt.testing._golden import (CASE_SUFFIX, DEFAULT_ATOL, DEFAULT_RTOL, GoldenCase,
                                      GoldenCaseError, GoldenResult, assert_golden, canonicalize,
                                      collect_cases, load_case, parse_case, run_case)

__all__ = ["CASE_SUFFIX", "DEFAULT_ATOL", "DEFAULT_RTOL", "GoldenCase", "GoldenCaseError",
           "GoldenResult", "assert_golden", "canonicalize", "collect_cases", "load_case",
           "parse_case", "run_case"]
