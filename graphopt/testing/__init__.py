"""The golden-test harness, for graphopt's own passes and for plugin authors.

One case per file, ``fixtures/<pass>/<case>.onnxtest``, in ONNX text syntax (``onnx.parser``
reads ``#`` comments) with header lines::

    # PIPELINE: eliminate-identity
    # TOLERANCE: rtol=1e-5 atol=1e-6        (optional; default rtol=1e-4 atol=1e-5)
    # DESCRIPTION: an Identity between two nodes goes
    # SEED: 0                               (optional: seed of the generated inputs)
    # DIMS: N=3 T=5                         (optional: values of symbolic dims in the inputs)
    # INPUT
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,4] y) { t = Identity(x)  y = Relu(t) }
    # EXPECTED
    <canonical text of the optimized model>

``# EXPECT-UNCHANGED`` in the header replaces the expected section: the pipeline must leave the
model canonically equal to the input (a "must not fire" case). ``# NUMERIC: skip <reason>``
turns the numeric check off for a model onnxruntime cannot run; the reason is required.

Checks, all of which must pass:

* structural: the output printed by ``ir.print_model(canonical=True)`` equals the expected
  section canonicalized the same way (parsed with ``onnx.parser`` and printed; a section that
  does not parse, e.g. one with tensor digests, is compared as canonical text with whitespace
  normalized);
* numeric: input and output run in onnxruntime with its optimizations off on seeded inputs and
  agree within the case's tolerance;
* the output passes ``ir.verify`` and ``onnx.checker.check_model``, and keeps the input's
  signature (graph input and output names and types).

Example:
    >>> from graphopt.testing import assert_golden, collect_cases
    >>> for path in collect_cases("fixtures"):  # doctest: +SKIP
    ...     assert_golden(path)

For pytest (``--update-goldens`` rewrites expected sections in place), see
:mod:`graphopt.testing.pytest_plugin`.
"""

from __future__ import annotations

from graphopt.testing._golden import (CASE_SUFFIX, DEFAULT_ATOL, DEFAULT_RTOL, GoldenCase,
                                      GoldenCaseError, GoldenResult, assert_golden, canonicalize,
                                      collect_cases, load_case, parse_case, run_case)

__all__ = ["CASE_SUFFIX", "DEFAULT_ATOL", "DEFAULT_RTOL", "GoldenCase", "GoldenCaseError",
           "GoldenResult", "assert_golden", "canonicalize", "collect_cases", "load_case",
           "parse_case", "run_case"]
