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
from graphopt.runtime import fit_to_runtime, make_session

__all__ = ["channel_absmax", "light_proto", "run_outputs", "saved_model"]


@contextlib.contextmanager
def saved_model(model: ir.Model, name: str = "model.onnx") -> Iterator[str]:
    """Write ``model`` (fitted to the runtime, weights as external data when large) to a temp file.

    The IR model itself is not changed: the copy fitted to the runtime is a fresh load of it.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-quant-") as tmp:
        path = os.path.join(tmp, name)
        ir.save(model, path)
        copy = ir.load(path)
        if fit_to_runtime(copy):
            ir.save(copy, path)
        yield path


def light_proto(path: str) -> onnx.ModelProto:
    """The model at ``path`` without its external weights (enough to read inputs and types)."""
    return onnx.load(path, load_external_data=False)


def _with_outputs(path: str, names: Sequence[str]) -> onnx.ModelProto:
    proto = onnx.load(path)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto


def channel_absmax(path: str, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
                   ) -> dict[str, np.ndarray]:
    """Largest ``|x|`` of each channel (last axis) of the float tensors ``names``, streamed over ``feeds``."""
    if not names:
        return {}
    session = make_session(_with_outputs(path, names))
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
    session = make_session(_with_outputs(path, extra) if extra else path, optimize=optimize and not extra)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    results = []
    for feed in feeds:
        values = session.run(names, {k: v for k, v in feed.items() if k in wanted})
        results.append(dict(zip(names, values)))
    return results
