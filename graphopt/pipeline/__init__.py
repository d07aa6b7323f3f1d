"""The pass manager and pass-authoring API.

Example:
    >>> from graphopt.pipeline import PassContext, PassManager
    >>> report = PassManager("cleanup", PassContext(opt_level=1)).run(model)  # doctest: +SKIP
"""

from __future__ import annotations

from graphopt.pipeline._context import TARGETS, AnalysisCache, Limits, PassContext
from graphopt.pipeline._instruments import (VERIFY_MODES, DumpIR, Instrument, PassStatistics,
                                            TimePasses, VerifyEach)
from graphopt.pipeline._manager import PassManager, PassRecord, PipelineReport, describe_ran_before
from graphopt.pipeline._parse import FixpointStep, PassStep, Step, format_pipeline, parse_pipeline
from graphopt.pipeline._pass import FunctionPass, Pass, PassResult, function_pass
from graphopt.pipeline._registry import ENTRY_POINT_GROUP, PassRegistry
from graphopt.pipeline._reproducer import CrashReproducer, ReproducerInput

__all__ = [
    "TARGETS", "Limits", "PassContext", "Instrument", "AnalysisCache", "PassManager", "PassRecord",
    "PipelineReport", "FixpointStep", "PassStep", "Step", "format_pipeline", "parse_pipeline",
    "FunctionPass", "Pass", "PassResult", "function_pass", "ENTRY_POINT_GROUP", "PassRegistry",
    "TimePasses", "PassStatistics", "DumpIR", "VerifyEach", "VERIFY_MODES", "CrashReproducer",
    "ReproducerInput", "describe_ran_before",
]
