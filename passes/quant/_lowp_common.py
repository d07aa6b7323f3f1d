"""Helpers shared by the weight-quantization and reduced-precision passes.

Weights are read from initializers only (never from graph inputs, which a caller may
override), new tensors are ``ir.LazyTensor(cache=False)``, computed whenever they are read (so a model
of several gigabytes never holds every converted weight at once), and replacement nodes take over
the outputs of the nodes they replace (names, types, ``value_info`` and graph outputs stay).
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx.helper as oh

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.runtime import PROVIDERS, session_options

__all__ = [
    "CONTRIB_DOMAIN",
    "add_weight",
    "compile_exclude",
    "parse_bool",
    "positive_int",
    "remove_if_unused",
    "require_opset",
    "session_loads",
    "transfer_outputs",
    "weight_tensor",
    "whole_weights",
]

logger = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"


def weight_tensor(value: ir.Value | None) -> ir.Tensor | None:
    """The tensor of an initializer no caller can override, else ``None``."""
    if value is None or not value.is_initializer() or value.is_graph_input():
        return None
    tensor = value.const_value
    return tensor if isinstance(tensor, ir.Tensor) else None


def transfer_outputs(old: ir.Node, new_inputs: list[ir.Value | None], *, op_type: str, domain: str = "",
                     attributes: dict | None = None, outputs: list[ir.Value] | None = None,
                     name: str = "") -> ir.Node:
    """Put a new node in place of ``old`` that computes ``old``'s outputs (same value objects).

    The new node is inserted before ``old`` and ``old`` is removed, so names, declared types,
    ``value_info`` entries and graph outputs all stay as they were.
    """
    graph = old.graph
    assert graph is not None
    kept = list(outputs if outputs is not None else old.outputs)
    old.set_outputs([ir.Value() for _ in old.outputs])
    node = ir.Node(domain, op_type, new_inputs, attributes=attributes or {}, outputs=kept,
                   name=name or old.name)
    graph.insert_before(old, node)
    graph.remove(old, force=True)
    return node


def add_weight(graph: ir.Graph, model: ir.Model, hint: str, compute: Callable[[], np.ndarray],
               dtype: int, shape: tuple[int, ...]) -> ir.Value:
    """A new initializer of ``graph`` whose data ``compute()`` yields whenever it is read (never cached)."""
    name = model.unique_name(hint)
    return graph.add_initializer(name, ir.LazyTensor(compute, dtype, tuple(int(d) for d in shape), cache=False))


def whole_weights(weights: list[ir.Value]) -> set[int]:
    """Ids of the weights that only the candidate readers listed read (one entry per reader).

    A weight also read by another node must keep its float copy, so it is not converted at
    all. Call it before any rewrite: rewiring the first reader changes the use count.
    """
    readers = Counter(id(w) for w in weights)
    by_id = {id(w): w for w in weights}
    return {key for key, count in readers.items() if by_id[key].num_uses == count}


def remove_if_unused(value: ir.Value) -> bool:
    """Drop an initializer nothing reads any more (never a graph input or output)."""
    graph = value.graph
    if graph is None or value.has_uses() or value.is_graph_input() or value.is_graph_output():
        return False
    if graph.initializers.get(value.name) is not value:
        return False
    graph.remove_initializer(value)
    return True


def require_opset(model: ir.Model, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` unless the model already imports it."""
    if domain not in model.opset_imports:
        model.opset_imports[domain] = version


def compile_exclude(pattern: str, pass_name: str) -> re.Pattern[str] | None:
    """The compiled ``exclude`` regex of a pass (``None`` when empty)."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PipelineError(f"pass '{pass_name}': exclude='{pattern}' is not a valid regular "
                            f"expression ({exc}); escape special characters") from None


def parse_bool(value: object, option: str, pass_name: str) -> bool:
    """An option given as 0/1, true/false."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PipelineError(f"pass '{pass_name}': option {option}='{value}' is not a boolean; use 0 or 1")


def positive_int(value: object, option: str, pass_name: str, minimum: int = 0) -> int:
    """An integer option at least ``minimum``."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise PipelineError(f"pass '{pass_name}': option {option}='{value}' is not an integer") from None
    if number < minimum:
        raise PipelineError(f"pass '{pass_name}': option {option}={number} must be at least {minimum}")
    return number


@functools.cache
def session_loads(target: str, model_bytes: bytes, run: bool = True) -> bool:
    """True when ``target``'s execution provider alone loads (and runs) the one-node model.

    Inputs are fed with ones of the declared shapes (every dim must be static when
    ``run``). Results are cached per process.
    """
    import onnxruntime as ort

    provider = PROVIDERS[target]
    if provider not in ort.get_available_providers():
        raise LookupError(provider)
    options = session_options(only_provider=provider, log_severity=4)
    try:
        session = ort.InferenceSession(model_bytes, options, providers=[provider])
        if run:
            feeds = {}
            for info in onnx.load_from_string(model_bytes).graph.input:
                dtype = oh.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
                shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
                feeds[info.name] = np.ones(shape, dtype)
            session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class: any failure means "no"
        logger.debug("%s does not run the probe: %s", provider, " ".join(str(exc).split())[:200])
        return False
    return True
