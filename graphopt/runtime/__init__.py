"""Running models in onnxruntime: sessions, generated inputs, output comparison, targets."""

from __future__ import annotations

from graphopt.runtime._session import (PROVIDERS, Comparison, OutputDiff, compare_outputs,
                                       make_session, max_ir_version, random_inputs, run_model)
from graphopt.runtime._targets import (RuntimeLimits, fit_to_runtime, required_ir_version,
                                       runtime_limits)

__all__ = ["PROVIDERS", "Comparison", "OutputDiff", "compare_outputs", "make_session",
           "max_ir_version", "random_inputs", "run_model", "RuntimeLimits", "fit_to_runtime",
           "required_ir_version", "runtime_limits"]
