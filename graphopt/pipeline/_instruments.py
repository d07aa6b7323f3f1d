"""Instruments: observers the pass manager calls around every pass.

Subclass :class:`Instrument` and override the hooks you need; put instances in
``PassContext.instruments``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphopt.ir import Model
    from graphopt.pipeline._context import PassContext
    from graphopt.pipeline._manager import PassRecord, PipelineReport
    from graphopt.pipeline._pass import Pass

__all__ = ["Instrument"]


class Instrument:
    """Base class: every hook does nothing."""

    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Called once before the first pass."""

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        """Called before each pass runs."""

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Called after each pass that returned normally."""

    def on_pass_error(self, p: Pass, model: Model, ctx: PassContext, exc: BaseException,
                      ran_before: list[str]) -> None:
        """Called when a pass raised an unexpected exception."""

    def on_pipeline_end(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Called once after the last pass (also after a failure)."""
