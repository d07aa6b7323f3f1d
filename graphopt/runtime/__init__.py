"""Running models in onnxruntime: sessions, generated inputs, output comparison, targets."""

from __future__ import annotations

from graphopt.runtime._session import (PROVIDERS, Comparison, OutputDiff, compare_outputs,
                                       make_session, max_ir_version, random_inputs, run_model)

__all__ = ["PROVIDERS", "Comparison", "OutputDiff", "compare_outputs", "make_session",
           "max_ir_version", "random_inputs", "run_model"]
