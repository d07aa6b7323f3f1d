"""Running models in onnxruntime: sessions, generated inputs, output comparison, targets."""

from __future__ import annotations

from graphopt.runtime._session import (PROVIDERS, Comparison, OutputDiff, compare_outputs,
                                       make_session, max_ir_version, random_inputs, run_model)
from graphopt.runtime._targets import (RuntimeLimits, fit_to_runtime, required_ir_version,
                                       runtime_limits)

__all__ = ["PROVIDERS", "Comparison", "OutputDiff", "compare_outputs", "make_session",
           "max_ir_version", "random_inputs", "run_model", "RuntimeLimits", "fit_to_runtime",
           "required_ir_version", "runtime_limits"]

from graphopt.runtime._bench import BenchResult, EnergyResult, bench_models, model_size_on_disk
from graphopt.runtime._inputs import (check_feeds, generate_feeds, load_feeds, open_session,
                                      parse_dims)
from graphopt.runtime._verify import LayerCheck, OutputCheck, VerifyReport, verify_models

__all__ += ["BenchResult", "EnergyResult", "bench_models", "model_size_on_disk", "check_feeds",
            "generate_feeds", "load_feeds", "open_session", "parse_dims", "LayerCheck",
            "OutputCheck", "VerifyReport", "verify_models"]
