"""Errors that graphopt raises for problems a user can fix.

Every error here carries a one-line message that names the object at fault and, where possible,
what to do about it. The CLI prints the message and exits with code 2; it shows a traceback only
with ``--debug``. Anything else that escapes is a bug in graphopt.
"""

from __future__ import annotations

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "ExternalDataError",
    "UnsupportedModelError",
    "VerificationError",
    "PipelineError",
    "PassError",
    "EmitError",
]


class GraphoptError(Exception):
    """Base class of every error caused by the input or the configuration, not by graphopt."""


class ModelLoadError(GraphoptError):
    """The file or bytes are not a readable ONNX model (missing, truncated, not protobuf)."""


class ExternalDataError(ModelLoadError):
    """A tensor's external data is missing, too short, or points outside the model's folder."""


class UnsupportedModelError(GraphoptError):
    """The model is valid ONNX but uses something graphopt or the target runtime cannot handle."""


class VerificationError(GraphoptError):
    """The IR breaks an invariant (cycle, dangling input, duplicate producer, missing opset)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        head = problems[0] if problems else "unknown problem"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{head}{more}")


class PipelineError(GraphoptError):
    """A pipeline string or pass configuration is wrong (unknown pass, bad syntax, bad option)."""


class PassError(GraphoptError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str, ran_before: list[str],
                 reproducer: str | None = None) -> None:
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.reproducer = reproducer
        super().__init__(message)


class EmitError(GraphoptError):
    """The model cannot be written in a form that the target runtime accepts."""
