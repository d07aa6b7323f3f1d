"""Helpers that hand an IR model to onnxruntime through a file (models over 2 GB included)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from graphopt import ir
from graphopt.runtime import fit_to_runtime, session_on_file

__all__ = ["channel_absmax", "light_proto", "run_outputs", "saved_model"]


@contextlib.contextmanager
def saved_model(model: ir.Model, name: str = "model.onnx") -> Iterator[str]:
    """Write ``model`` (fitted to the runtime, weights as external data) to a temp file.

    The IR model itself is not changed: the copy fitted to the runtime is a fresh load of it.
    External data lets sessions that fetch intermediate tensors leave the weights to
    onnxruntime (:func:`graphopt.runtime.session_on_file`), whatever the model's size.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-quant-") as tmp:
        path = os.path.join(tmp, name)
        ir.save(model, path, external_data=True)
        copy = ir.load(path)
        if fit_to_runtime(copy):
            ir.save(copy, path, external_data=True)
        yield path


def light_proto(path: str) -> onnx.ModelProto:
    """The model at ``path`` without its external weights (enough to read inputs and types)."""
    return onnx.load(path, load_external_data=False)


def channel_absmax(path: str, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
                   ) -> dict[str, np.ndarray]:
    """Largest ``|x|`` of each channel (last axis) of the float tensors ``names``, streamed over ``feeds``."""
    if not names:
        return {}
    # The weights stay in the file (onnxruntime reads them): no copy of a large model in Python.
    session = session_on_file(path, extra_outputs=names)
    wanted = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(list(names), {k: v for k, v in feed.items() if k in wanted})
        for name, value in zip(names, values):
            a = np.abs(np.asarray(value, dtype=np.float32))
            m = a.reshape(-1, a.shape[-1]).max(axis=0) if a.size else np.zeros(a.shape[-1], np.float32)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def run_outputs(path: str, feeds: Sequence[Mapping[str, np.ndarray]], extra: Sequence[str] = (),
                optimize: bool = True) -> list[dict[str, Any]]:
    """Run the model at ``path`` on every feed; outputs (plus ``extra`` tensors) by name, per feed."""
    session = session_on_file(path, extra_outputs=extra, optimize=optimize and not extra)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    results = []
    for feed in feeds:
        values = session.run(names, {k: v for k, v in feed.items() if k in wanted})
        results.append(dict(zip(names, values)))
    return results
