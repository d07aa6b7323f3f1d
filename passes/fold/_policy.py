"""Which nodes constant folding may evaluate, whatever their inputs.

Never folded:

* quantization boundaries (``QuantizeLinear``, ``DequantizeLinear``, ``DynamicQuantizeLinear``):
  a ``DequantizeLinear`` of a constant weight *is* the quantized model's format;
* random generators (``RandomNormal``, ``RandomUniform``, their ``*Like`` forms, ``Multinomial``,
  ``Bernoulli``) and ``Dropout`` in training mode: a folded sample would repeat on every run;
* nodes holding subgraphs other than ``If``, ``Loop`` and ``Scan`` (``SequenceMap``, custom
  ops); the three control-flow ops fold only as a whole, when their inputs *and* every value
  their bodies read from enclosing scopes are constant (else their bodies are folded on
  their own);
* sequence, optional and map producers: folded values become tensor initializers;
* nodes outside the standard domains (``""``, ``ai.onnx``, ``ai.onnx.ml``), including calls of
  model-local functions and onnxruntime contrib ops.
"""

from __future__ import annotations

from graphopt import ir

__all__ = ["FOLD_DOMAINS", "CONTROL_FLOW", "why_not_foldable", "captured_values"]

#: Domains whose operators folding evaluates.
FOLD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

_QUANTIZATION = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"})
#: Control flow folded as a whole when everything it reads is constant.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_NON_TENSOR = frozenset({"SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
                         "SplitToSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
                         "SequenceAt", "SequenceLength", "ConcatFromSequence", "ZipMap",
                         "CastMap", "DictVectorizer"})


def _is_training_dropout(node: ir.Node) -> bool:
    """True when a ``Dropout`` may drop (training mode, or not provably inference)."""
    version = node.version or 13
    if version < 7:
        return node.attr("is_test", 0) == 0
    if version < 12 or len(node.inputs) < 3 or node.inputs[2] is None:
        return False
    mode = node.inputs[2]
    if not mode.is_constant() or not isinstance(mode.const_value, ir.Tensor):
        return True
    return bool(mode.const_value.numpy().reshape(-1)[:1].any())


def why_not_foldable(node: ir.Node, model: ir.Model) -> str:
    """Why ``node`` may not be folded even with constant inputs ("" when it may).

    Example:
        >>> why_not_foldable(dequantize_node, model)  # doctest: +SKIP
        'DequantizeLinear is a quantization boundary'
    """
    if node.domain not in FOLD_DOMAINS:
        return f"domain '{node.domain}' is not evaluated by folding"
    if (node.domain, node.op_type, node.overload) in model.functions:
        return f"{node.op_type} calls a model-local function"
    op = node.op_type
    if op in _QUANTIZATION:
        return f"{op} is a quantization boundary"
    if op in _RANDOM:
        return f"{op} is random"
    if node.subgraphs() and op not in CONTROL_FLOW:
        return f"{op} holds subgraphs"
    if op in _NON_TENSOR or op == "SequenceMap":
        return f"{op} works on sequences, optionals or maps"
    if op == "Dropout" and _is_training_dropout(node):
        return "Dropout may run in training mode"
    if not node.outputs:
        return f"{op} has no outputs"
    for out in node.outputs:
        if out.type is not None and not isinstance(out.type, ir.TensorType):
            return f"output '{out.name}' is not a tensor"
    return ""


def captured_values(node: ir.Node) -> list[ir.Value]:
    """Values that ``node``'s subgraphs (at any depth) read from enclosing scopes, in order.

    Example:
        >>> [v.name for v in captured_values(if_node)]  # doctest: +SKIP
        ['weight']
    """
    defined: set[ir.Value] = set()
    read: dict[ir.Value, None] = {}
    for sub in node.subgraphs():
        for g in [sub, *sub.subgraphs()]:
            defined.update(g.inputs)
            defined.update(g.initializers.values())
            defined.update(g.sparse_initializers.values())
            for inner in g:
                defined.update(inner.outputs)
        for inner in sub.all_nodes():
            for v in inner.inputs:
                if v is not None:
                    read.setdefault(v, None)
        for g in [sub, *sub.subgraphs()]:
            for v in g.outputs:
                read.setdefault(v, None)
    return [v for v in read if v not in defined]
