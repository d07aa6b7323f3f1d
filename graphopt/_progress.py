"""Progress bars on stderr for the steps that can take a while: loading, the pipeline, saving.

A :class:`ProgressDisplay` is created by the command line and handed explicitly to the code that
reports progress (``graphopt.optimize_model(progress=...)``); nothing here is global. It draws
only when it is enabled and stderr is a terminal, so pipes, CI logs and ``--quiet`` stay clean,
and it appears only once a step has run for ``delay`` seconds, so fast runs never flicker.

Example:
    >>> with ProgressDisplay.for_stderr(quiet=False) as progress:  # doctest: +SKIP
    ...     outcome = optimize_model("big.onnx", output="out.onnx", progress=progress)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from graphopt.pipeline import Instrument

if TYPE_CHECKING:
    from graphopt.ir import Model
    from graphopt.pipeline import PassContext, PassRecord, PipelineReport
    from graphopt.pipeline import Pass

__all__ = ["ProgressDisplay", "PassProgress", "ByteCallback"]

logger = logging.getLogger(__name__)

#: Called with (bytes done, bytes in all) as a file is read or written.
ByteCallback = Callable[[int, int], None]


class ProgressDisplay:
    """Draws progress on a rich console; every method is a cheap no-op when disabled.

    Args:
        enabled: draw at all (the CLI passes ``not quiet and stderr is a terminal``).
        console: where to draw (default: a console on stderr).
        delay: seconds a step must run before the display appears.
    """

    def __init__(self, *, enabled: bool, console: Console | None = None, delay: float = 0.5) -> None:
        self.enabled = enabled
        self.console = console if console is not None else Console(stderr=True)
        self.delay = delay
        self._progress: Progress | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._started = False
        self._closed = False

    @classmethod
    def for_stderr(cls, *, quiet: bool, delay: float = 0.5) -> ProgressDisplay:
        """A display on stderr, enabled unless ``quiet`` or stderr is not a terminal."""
        console = Console(stderr=True)
        return cls(enabled=not quiet and console.is_terminal, console=console, delay=delay)

    # -- lifetime ----------------------------------------------------------------------------------
    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.fields[note]}"),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._closed = False
            if self.delay <= 0:
                self._show()
            else:
                self._timer = threading.Timer(self.delay, self._show)
                self._timer.daemon = True
                self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            self._closed = True
            if self._progress is not None and self._started:
                self._progress.stop()
            self._started = False
            self._progress = None

    def _show(self) -> None:
        with self._lock:
            if self._progress is not None and not self._closed and not self._started:
                self._progress.start()
                self._started = True

    @property
    def visible(self) -> bool:
        """True while the display is drawn on the console."""
        return self._started

    # -- steps -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bytes_step(self, description: str) -> Iterator[ByteCallback | None]:
        """A step measured in bytes (reading or writing a model); yields a callback or ``None``.

        Example:
            >>> with display.bytes_step("saving") as advance:  # doctest: +SKIP
            ...     ir.save(model, "out.onnx", progress=advance)
        """
        progress = self._progress
        if progress is None:
            yield None
            return
        task = progress.add_task(description, total=None, note="")

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None,
                            note=f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else "")

        try:
            yield advance
        finally:
            progress.remove_task(task)

    def pass_instrument(self) -> PassProgress | None:
        """An instrument that shows the running pass, or ``None`` when the display is off."""
        if self._progress is None:
            return None
        return PassProgress(self._progress)


class PassProgress(Instrument):
    """Shows the pass that runs and how many have run; put it in ``PassContext.instruments``."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None
        self._depth = 0
        self._done = 0

    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Open the task for the outermost pipeline run (nested runs are counted in it)."""
        self._depth += 1
        if self._depth == 1:
            self._done = 0
            self._task = self._progress.add_task("optimizing", total=None, note="")

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        """Name the pass about to run."""
        if self._task is not None and self._depth == 1:
            self._progress.update(self._task, description=f"pass {p.name}",
                                  note=f"{self._done} passes run")

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Count the pass."""
        if self._task is not None and self._depth == 1:
            self._done += 1
            self._progress.update(self._task, note=f"{self._done} passes run")

    def on_pipeline_end(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Close the task when the outermost run ends."""
        self._depth -= 1
        if self._depth == 0 and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
