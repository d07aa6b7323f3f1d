"""The pass registry: pass names to classes, plus named pipelines (``cleanup``, ``-O2``...).

The default registry holds the built-in library (``graphopt.passes``) and every plugin found
through the entry-point group ``graphopt.passes``. A plugin entry point may name a
:class:`~graphopt.pipeline.Pass` subclass, a list of them, or a module whose ``PASSES`` list
(and optional ``PIPELINES`` dict) it exports. ``--load-pass path.py`` loads a local file the same
way.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Iterable

from graphopt.errors import PipelineError
from graphopt.pipeline._pass import Pass

__all__ = ["PassRegistry", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt.passes"


class PassRegistry:
    """Maps pass names to pass classes and pipeline names to pipeline strings.

    Example:
        >>> reg = PassRegistry()
        >>> reg.register_pipeline("mine", "eliminate-identity,eliminate-dead-code")
        >>> reg.pipeline("mine")
        'eliminate-identity,eliminate-dead-code'
    """

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._pipelines: dict[str, str] = {}
        self._origin: dict[str, str] = {}

    # -- passes ------------------------------------------------------------------------------------
    def register(self, pass_cls: type[Pass], *, origin: str = "", replace: bool = False) -> None:
        """Add a pass class under its ``name``."""
        if not (inspect.isclass(pass_cls) and issubclass(pass_cls, Pass)) or not pass_cls.name:
            raise PipelineError(f"{pass_cls!r} is not a Pass subclass with a name")
        existing = self._passes.get(pass_cls.name)
        if existing is not None and existing is not pass_cls and not replace:
            raise PipelineError(f"two passes are named '{pass_cls.name}' ({self._origin[pass_cls.name]} "
                                f"and {origin or pass_cls.__module__}); rename one")
        self._passes[pass_cls.name] = pass_cls
        self._origin[pass_cls.name] = origin or pass_cls.__module__

    def get(self, name: str) -> type[Pass]:
        """The pass class called ``name``; a clear error suggests near names when unknown."""
        try:
            return self._passes[name]
        except KeyError:
            import difflib

            near = difflib.get_close_matches(name, list(self._passes) + list(self._pipelines), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else "; run 'graphopt passes' to list them"
            raise PipelineError(f"unknown pass '{name}'{hint}") from None

    def has(self, name: str) -> bool:
        """True when ``name`` is a registered pass."""
        return name in self._passes

    def passes(self) -> list[type[Pass]]:
        """All pass classes, sorted by name."""
        return [self._passes[k] for k in sorted(self._passes)]

    def origin(self, name: str) -> str:
        """Where a pass came from (module or plugin)."""
        return self._origin.get(name, "")

    # -- pipelines ---------------------------------------------------------------------------------
    def register_pipeline(self, name: str, text: str) -> None:
        """Give a pipeline string a name usable inside other pipelines."""
        self._pipelines[name] = text

    def pipeline(self, name: str) -> str | None:
        """The pipeline string registered as ``name`` (``O2`` and ``-O2`` are the same)."""
        return self._pipelines.get(name.lstrip("-"))

    def pipelines(self) -> dict[str, str]:
        """All named pipelines."""
        return dict(self._pipelines)

    # -- loading -------------------------------------------------------------------------------
    def load_module(self, module: ModuleType, *, origin: str = "") -> int:
        """Register a module's ``PASSES`` (or every named Pass subclass it defines) and ``PIPELINES``."""
        found: Iterable[Any] = getattr(module, "PASSES", None) or [
            obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Pass) and obj.name
            and obj.__module__ == module.__name__]
        n = 0
        for cls in found:
            self.register(cls, origin=origin or module.__name__)
            n += 1
        for name, text in getattr(module, "PIPELINES", {}).items():
            self.register_pipeline(name, text)
        return n

    def load_object(self, obj: Any, *, origin: str) -> int:
        """Register what an entry point pointed at: a module, a Pass subclass, or a list."""
        if isinstance(obj, ModuleType):
            return self.load_module(obj, origin=origin)
        if inspect.isclass(obj) and issubclass(obj, Pass):
            self.register(obj, origin=origin)
            return 1
        if callable(obj) and not inspect.isclass(obj):
            obj = obj()
        if isinstance(obj, (list, tuple)):
            for cls in obj:
                self.register(cls, origin=origin)
            return len(obj)
        raise PipelineError(f"plugin {origin} exports {obj!r}, not a Pass class, a list of them or a module")

    def load_file(self, path: str) -> int:
        """Import a Python file and register the passes it defines (``--load-pass``)."""
        if not os.path.isfile(path):
            raise PipelineError(f"--load-pass: file '{path}' does not exist")
        mod_name = "graphopt_plugin_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise PipelineError(f"--load-pass: cannot import '{path}'")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the plugin's own bug: report it as a user-facing error
            raise PipelineError(f"--load-pass: importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
        n = self.load_module(module, origin=path)
        if n == 0:
            raise PipelineError(f"--load-pass: '{path}' defines no Pass subclass with a name")
        return n

    def load_entry_points(self) -> int:
        """Register every plugin of the ``graphopt.passes`` entry-point group."""
        n = 0
        for ep in _plugin_entry_points(tuple(sys.path)):
            try:
                obj = ep.load()
                n += self.load_object(obj, origin=f"plugin {ep.name} ({ep.value})")
            except PipelineError:
                raise
            except Exception as exc:  # a broken plugin must not break graphopt
                logger.warning("cannot load graphopt plugin %s (%s): %s", ep.name, ep.value, exc)
        return n

    @classmethod
    def default(cls, *, plugins: bool = True) -> PassRegistry:
        """The built-in passes and pipelines, plus installed plugins unless ``plugins=False``."""
        reg = cls()
        builtin = importlib.import_module("graphopt.passes")
        reg.load_module(builtin, origin="graphopt")
        if plugins:
            reg.load_entry_points()
        return reg


@functools.lru_cache(maxsize=8)
def _plugin_entry_points(search_path: tuple[str, ...]) -> tuple[Any, ...]:
    """The ``graphopt.passes`` entry points visible on ``search_path``.

    Scanning every installed distribution's metadata costs tens of milliseconds; it is done
    once per distinct ``sys.path`` (a plugin installed into a new path entry is still found).
    """
    return tuple(entry_points(group=ENTRY_POINT_GROUP))
