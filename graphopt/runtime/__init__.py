"""Running models in onnxruntime: sessions, generated inputs, output comparison, targets."""

from __future__ import annotations

from graphopt.runtime._session import (PROVIDERS, Comparison, OutputDiff, compare_outputs,
                                       make_session, max_ir_version, random_inputs, run_model,
                                       session_options)
from graphopt.runtime._targets import (RuntimeLimits, fit_to_runtime, required_ir_version,
                                       runtime_limits)

__all__ = ["PROVIDERS", "Comparison", "OutputDiff", "compare_outputs", "make_session",
           "max_ir_version", "random_inputs", "run_model", "session_options", "RuntimeLimits", "fit_to_runtime",
           "required_ir_version", "runtime_limits"]

from graphopt.runtime._bench import BenchResult, EnergyResult, bench_models, model_size_on_disk
from graphopt.runtime._inputs import (check_feeds, generate_feeds, load_feeds, open_session,
                                      parse_dims)
from graphopt.runtime._verify import LayerCheck, OutputCheck, VerifyReport, verify_models

__all__ += ["BenchResult", "EnergyResult", "bench_models", "model_size_on_disk", "check_feeds",
            "generate_feeds", "load_feeds", "open_session", "parse_dims", "LayerCheck",
            "OutputCheck", "VerifyReport", "verify_models"]

from graphopt.runtime._manifest import (MANIFEST_FORMAT, MANIFEST_NAME, Manifest, PartitionSpec,
                                        TensorSpec, TransferSpec)

__all__ += ["MANIFEST_FORMAT", "MANIFEST_NAME", "Manifest", "PartitionSpec", "TensorSpec", "TransferSpec"]

from graphopt.runtime._calib_data import CalibrationSource, open_calibration_data, split_held_out
from graphopt.runtime._calib_stats import TensorStatistics
from graphopt.runtime._calibration import CalibrationResult, calibrate, session_on_file
from graphopt.runtime._similarity import load_metric, output_similarity

__all__ += ["CalibrationSource", "open_calibration_data", "split_held_out", "TensorStatistics",
            "CalibrationResult", "calibrate", "session_on_file", "load_metric", "output_similarity"]

from graphopt.runtime._fusion_check import INTEGER_KERNELS, FusionReport, check_fusion, fusion_report

__all__ += ["INTEGER_KERNELS", "FusionReport", "check_fusion", "fusion_report"]

from graphopt.runtime._partitioned import BACKENDS, PartitionedSession, PartitionEvent

__all__ += ["BACKENDS", "PartitionedSession", "PartitionEvent"]
