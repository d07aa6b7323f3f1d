"""``contrib-attention``: multi-head attention blocks of exports become ``com.microsoft::MultiHeadAttention``.

Algebra: with ``q, k, v`` of shape ``[B, S, H]`` (``H = N·D``, ``N`` heads of size ``D``),
``split(t) = Transpose(Reshape(t, [B, S, N, D]), [0, 2, 1, 3])`` and
``merge(c) = Reshape(Transpose(c, [0, 2, 1, 3]), [B, S, H])``::

    merge(Softmax(α · split(q) @ split(k)ᵀ + M) @ split(v))
        = MultiHeadAttention(q, k, v, attention_bias=M, num_heads=N, scale=α)

and with a causal mask (``Where(tril, scores, −big)``) the same with ``unidirectional=1``.

The forms recognized, as the TorchScript and dynamo exporters of PyTorch write them (BERT-style
encoders with three projections, GPT-2-style decoders whose ``q, k, v`` come from one ``Split``;
checked on HF BERT and GPT-2 exported with eager and SDPA attention by both exporters):

* ``split(k)ᵀ`` as ``Transpose(Reshape(k), [0, 2, 3, 1])``, as two Transposes (``[0, 2, 1, 3]``
  then ``[0, 1, 3, 2]``) or, from the dynamo exporter, through a 3-D flatten
  (``Reshape(Transpose(Reshape(split(k), [-1, L, D]), [0, 2, 1]), [B, N, D, L])``); the
  normalizations ``attention-key-*`` rewrite the last two into the first;
* the scale ``α`` as ``Div(scores, c)``, ``Mul(scores, c)``, a ``Mul`` of both ``split(q)`` and
  ``split(k)ᵀ`` by constants (the SDPA decomposition: ``α = c_q·c_k``), of ``split(q)`` only,
  or absent (``α = 1``);
* the mask as absent, ``Add(scores, M)`` (any additive mask that broadcasts to the scores:
  BERT's ``(1 − mask)·−10000`` of shape ``[B, 1, 1, S]``, the combined causal and padding mask
  of recent transformers, a bool mask turned additive by ``Where``), ``Where(tril, scores,
  fill)`` (causal; ``tril`` a constant lower-triangular boolean matrix, or ``Trilu(ones,
  upper=0)``), or the causal ``Where`` followed by an ``Add``;
* ``Softmax`` over the last axis, optionally followed by the SDPA NaN guard
  ``Where(IsNaN(p), 0, p)``: where the mask is provably finite the guard is a no-op and goes;
  otherwise a row masked out entirely gives NaN probabilities (hence a zero output row), so
  the guard is kept on the output of the fused op, where it turns that NaN row into zeros;
* an identity ``Reshape`` of the context (SDPA exports) before the head merge, and a final
  Reshape to another shape than ``[B, S, H]`` (e.g. ``[B·S, H]`` before a Gemm), which is kept
  after the fused op (both hold the same elements in the same order).

Reshape targets are read symbolically (``Concat`` of ``Shape``/``Gather``/``Slice`` pieces, see
``_shapes``), so dynamic batch and sequence dims that shape inference cannot name still prove.
Not recognized: the packed-weight ``Attention`` op is not emitted (``MultiHeadAttention`` keeps
the three projections as they are), multi-query/grouped-query attention, attention with past
key/values, and GPT-2's pre-4.36 causal mask sliced at run time from a ``[1, 1, 1024, 1024]``
buffer.

onnxruntime requires ``attention_bias`` to be 4-D ``[B or 1, N or 1, S, L]``; a mask of another
shape is broadcast to that with one ``Expand`` (``[B, 1, 1, L]`` → ``[B, 1, S, L]``), which is
exactly the broadcasting the ``Add`` did.

Must not fire when:

* the target has no ``MultiHeadAttention`` kernel for the element type;
* shapes do not prove the head split: ``q``, ``k``, ``v`` must be 3-D with one known hidden size
  ``H``, the Reshapes must produce ``[B, S, N, D]`` with static ``N·D = H`` and batch and
  sequence dims provably those of the input, and the final Reshape must give back ``q``'s shape;
* ``k`` and ``v`` may differ in batch or sequence length from each other, or ``k`` from ``q`` in
  batch;
* a scale is not a one-element float constant (``Div`` by zero included);
* the mask may have more than 4 dims or another element type, or the causal condition is not a
  lower-triangular ``[S, S]`` matrix with ``S`` the (equal) query and key length, or the fill
  is not below −10⁴ (softmax would not give those positions exactly 0);
* ``Softmax`` is not over the last axis;
* an intermediate (scores, probabilities, split heads) is read elsewhere or is a graph output
  (the engine refuses).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import numpy as np
import onnx

from graphopt import ir
from graphopt.pipeline import PassContext, PassResult
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, apply_rules, constant_value

from graphopt.passes.contrib._common import CONTRIB_DOMAIN, kernel_reason, same_dim, scalar_constant, static_rank
from graphopt.passes.contrib._shapes import DimLabels, OriginMemo, head_sizes, same_dim_ref, shape_elements

__all__ = ["ContribAttention", "ATTENTION_RULES", "attention_rules", "SCALE_FORMS", "MASK_FORMS"]

#: How the scale is applied.
SCALE_FORMS = ("div", "mul", "prescale-qk", "prescale-q", "none")
#: How the mask is applied.
MASK_FORMS = ("none", "add", "causal", "causal-add")
#: A causal fill must push scores this far down for softmax to give exactly 0 in float32.
MAX_CAUSAL_FILL = -1e4

logger = logging.getLogger(__name__)

_HEAD_SPLIT = (0, 2, 1, 3)
_KEY_SPLIT_T = (0, 2, 3, 1)


def _variables(scale: str, mask: str, reshape: bool, guard: bool) -> list[str]:
    names = ["q", "k", "v", "q_shape", "k_shape", "v_shape", "out_shape"]
    names += ["context_shape"] if reshape else []
    names += ["zero"] if guard else []
    names += {"div": ["scale"], "mul": ["scale"], "prescale-qk": ["q_scale", "k_scale"],
              "prescale-q": ["q_scale"], "none": []}[scale]
    names += {"none": [], "add": ["mask"], "causal": ["causal", "fill"], "causal-add": ["causal", "fill", "mask"]}[mask]
    return names


def _pattern(scale: str, mask: str, reshape: bool, guard: bool) -> Callable[..., Any]:
    names = _variables(scale, mask, reshape, guard)

    def pattern(op: Any, *values: Any) -> Any:
        var = dict(zip(names, values))
        qh = op.Transpose(op.Reshape(var["q"], var["q_shape"], _name="q_reshape"), perm=_HEAD_SPLIT, _name="q_heads")
        kt = op.Transpose(op.Reshape(var["k"], var["k_shape"], _name="k_reshape"), perm=_KEY_SPLIT_T)
        if scale == "prescale-qk":
            qh, kt = op.Mul(qh, var["q_scale"]), op.Mul(kt, var["k_scale"])
        elif scale == "prescale-q":
            qh = op.Mul(qh, var["q_scale"])
        scores = op.MatMul(qh, kt)
        if scale in ("div", "mul"):
            scores = getattr(op, scale.capitalize())(scores, var["scale"])
        if mask in ("causal", "causal-add"):
            scores = op.Where(var["causal"], scores, var["fill"])
        if mask in ("add", "causal-add"):
            scores = op.Add(scores, var["mask"])
        probs = op.Softmax(scores, _name="softmax")
        if guard:
            probs = op.Where(op.IsNaN(probs), var["zero"], probs)
        vh = op.Transpose(op.Reshape(var["v"], var["v_shape"], _name="v_reshape"), perm=_HEAD_SPLIT)
        context = op.MatMul(probs, vh, _name="context")
        if reshape:
            context = op.Reshape(context, var["context_shape"], _name="context_reshape")
        merged = op.Transpose(context, perm=_HEAD_SPLIT, _name="context_t")
        return op.Reshape(merged, var["out_shape"], _name="out_reshape")

    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["op", *names]]
    pattern.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    pattern.__qualname__ = _rule_name(scale, mask, reshape, guard).replace("-", "_")
    return pattern


# -- checks ------------------------------------------------------------------------------------------
#: Where :meth:`ContribAttention.run` keeps the dim-origin memo its rules share (``Model.meta``, never saved).
_MEMO_KEY = "contrib-attention/dim-origins"


def _origin_memo(model: ir.Model | None) -> OriginMemo:
    """The memo of dim-origin walks shared by every match of one pass run, or a fresh one.

    Each layer's proofs walk back through all the layers before it; shared, the walks cost
    linear time in the depth of the model instead of quadratic (0.6 s on GPT-2's 12 layers).
    Outside a pass run (``why-not``), each call gets its own.
    """
    memo = model.meta.get(_MEMO_KEY) if model is not None else None
    return memo if isinstance(memo, dict) else {}


def _scale(kind: str, bindings: dict[str, Any]) -> float | str:
    if kind == "none":
        return 1.0
    factors = [bindings[n] for n in ("scale", "q_scale", "k_scale") if n in bindings]
    result = 1.0
    for value in factors:
        number = scalar_constant(value, 4)
        if number is None:
            return f"the scale '{value.name}' is not a one-element float constant"
        if kind == "div":
            if number == 0.0:
                return f"the divisor '{value.name}' is zero"
            number = 1.0 / number
        result *= number
    return result


def _causal_reason(causal: ir.Value, fill: ir.Value, seq: ir.Dim) -> str | None:
    """Why ``Where(causal, scores, fill)`` is not a causal mask over ``seq`` query and key positions."""
    value = scalar_constant(fill, 4)
    if value is None or value > MAX_CAUSAL_FILL:
        return f"the causal fill '{fill.name}' is not a scalar constant <= {MAX_CAUSAL_FILL:g}"
    array = constant_value(causal)
    if array is not None:
        if array.dtype != np.bool_ or array.ndim < 2 or array.size != array.shape[-1] * array.shape[-2]:
            return f"the causal condition '{causal.name}' is not a boolean [S, S] matrix"
        matrix = array.reshape(array.shape[-2:])
        if matrix.shape[0] != matrix.shape[1] or not isinstance(seq, int) or matrix.shape[0] != seq:
            return f"the causal condition {list(array.shape)} does not match the sequence length {seq}"
        if not np.array_equal(matrix, np.tril(np.ones(matrix.shape, dtype=bool))):
            return f"the causal condition '{causal.name}' is not lower-triangular"
        return None
    node = causal.producer
    if node is not None and node.op_type == "Cast" and node.attr("to", 0) == onnx.TensorProto.BOOL:
        node = node.inputs[0].producer if node.inputs[0] is not None else None
    if node is None or node.op_type != "Trilu" or node.attr("upper", 1) != 0:
        return f"the causal condition '{causal.name}' is neither a constant nor Trilu(upper=0)"
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        k = constant_value(node.inputs[1])
        if k is None or k.size != 1 or int(k.reshape(-1)[0]) != 0:
            return "the causal Trilu has a diagonal offset"
    return _all_ones_reason(node.inputs[0], seq)


def _all_ones_reason(value: ir.Value | None, seq: ir.Dim) -> str | None:
    if value is None:
        return "the causal Trilu has no input"
    shape = value.shape
    if shape is None or shape.rank < 2 or not (same_dim(shape.dims[-1], seq) and same_dim(shape.dims[-2], seq)):
        return f"the causal Trilu input '{value.name}' is not provably [S, S] with S the sequence length"
    if any(d != 1 for d in shape.dims[:-2]):
        return f"the causal Trilu input '{value.name}' has leading dims other than 1"
    array = constant_value(value)
    if array is not None:
        return None if array.size and np.all(array == 1) else f"the causal Trilu input '{value.name}' is not all ones"
    node = value.producer
    if node is not None and node.op_type == "ConstantOfShape":
        filler = node.attr("value", None)
        if filler is not None and np.all(filler.numpy() == 1):
            return None
    return f"the causal Trilu input '{value.name}' is not all ones"


def _mask_reason(mask: ir.Value, q: ir.Value) -> str | None:
    if mask.dtype != q.dtype:
        return f"the mask '{mask.name}' and the query have different element types"
    rank = static_rank(mask)
    if rank is None or rank > 4:
        return f"the mask '{mask.name}' is not known to have at most 4 dims"
    return None


def _dims(q: ir.Value, k: ir.Value, v: ir.Value, heads: tuple[int, int],
          memo: OriginMemo | None = None) -> DimLabels:
    """Names of the dims of q, k, v (checked to be ``[B, S, H]``, ``[B, L, H]``, ``[B, L, H]``)."""
    sizes = {"N": heads[0], "D": heads[1], "H": heads[0] * heads[1]}
    for name, dim in (("B", q.shape.dims[0]), ("S", q.shape.dims[1]), ("L", k.shape.dims[1])):
        if isinstance(dim, int):
            sizes[name] = dim
    return DimLabels({q: ("B", "S", "H"), k: ("B", "L", "H"), v: ("B", "L", "H")}, sizes, memo)


def _structure_reason(b: dict[str, Any], reshape: bool, memo: OriginMemo) -> tuple[int, int] | str:
    """``(N, D)`` when the Reshapes and Transposes provably split and merge heads, else why not."""
    q, k, v = b["q"], b["k"], b["v"]
    for x in (q, k, v):
        if static_rank(x) != 3:
            return f"'{x.name}' is not known to be 3-D ([batch, sequence, hidden])"
    split = []
    for x, node in ((q, b["q_reshape"]), (k, b["k_reshape"]), (v, b["v_reshape"])):
        heads = head_sizes(x, node)
        if isinstance(heads, str):
            return heads
        split.append(heads)
    if len(set(split)) != 1:
        return f"q, k and v are split into different heads: {split}"
    # The proofs walk back from q, k or v through the layers before it, and share nearly all of
    # their way: one memo serves the whole pass (see ``_origin_memo``). (The check and the
    # rewrite both call this function on the same graph, so they reach the same answer.)
    if not (same_dim_ref((k, 0), (q, 0), memo) and same_dim_ref((v, 0), (q, 0), memo)
            and same_dim_ref((v, 1), (k, 1), memo)):
        return "q, k and v do not provably share the batch size, or k and v the sequence length"
    dims = _dims(q, k, v, split[0], memo)
    checks = [(b["q_reshape"], ("B", "S", "H"), ("B", "S", "N", "D")),
              (b["k_reshape"], ("B", "L", "H"), ("B", "L", "N", "D")),
              (b["v_reshape"], ("B", "L", "H"), ("B", "L", "N", "D"))]
    # The split heads are named too, so targets computed from their shapes are read.
    dims.labels[b["q_reshape"].outputs[0]] = ("B", "S", "N", "D")
    dims.labels[b["k_reshape"].outputs[0]] = ("B", "L", "N", "D")
    dims.labels[b["v_reshape"].outputs[0]] = ("B", "L", "N", "D")
    dims.labels[b["q_heads"].outputs[0]] = ("B", "N", "S", "D")
    dims.labels[b["context"].outputs[0]] = ("B", "N", "S", "D")
    if reshape:
        dims.labels[b["context_reshape"].outputs[0]] = ("B", "N", "S", "D")
        checks.append((b["context_reshape"], ("B", "N", "S", "D"), ("B", "N", "S", "D")))
    dims.labels[b["context_t"].outputs[0]] = ("B", "S", "N", "D")
    for node, source, target in checks:
        reason = dims.reshape_reason(node, source, target)
        if reason:
            return f"{reason} ({node.op_type} of '{node.inputs[0].name}')"
    if dims.reshape_reason(b["out_reshape"], ("B", "S", "N", "D"), ("B", "S", "H")) is not None:
        reason = _reshape_after_reason(b["out_reshape"])
        if reason:
            return reason
    return split[0]


def _reshape_after_reason(out_reshape: ir.Node) -> str | None:
    """Why the final Reshape cannot be applied to the ``[B, S, H]`` output instead of ``[B, S, N, D]``.

    Both hold the same elements in the same order, so any target gives the same result, except
    a ``0`` past the second position (it copies ``N`` or ``D``, not ``H``).
    """
    elements = shape_elements(out_reshape.inputs[1] if len(out_reshape.inputs) > 1 else None)
    if elements is None:
        return "the final Reshape target can be read neither as [B, S, H] nor as numbers"
    if not out_reshape.attr("allowzero", 0) and any(e == 0 for e in elements[2:]):
        return "the final Reshape copies a head dim (a 0 past the second position)"
    return None


def _merges_heads(b: dict[str, Any], heads: tuple[int, int], memo: OriginMemo) -> bool:
    """True when the final Reshape provably gives ``[B, S, H]`` (else it is kept after the op)."""
    dims = _dims(b["q"], b["k"], b["v"], heads, memo)
    dims.labels[b["context_t"].outputs[0]] = ("B", "S", "N", "D")
    return dims.reshape_reason(b["out_reshape"], ("B", "S", "N", "D"), ("B", "S", "H")) is None


def _check(scale: str, mask: str, reshape: bool, guard: bool) -> Callable[..., Any]:
    def check(ctx: MatchContext, **b: Any) -> Any:
        q, k = b["q"], b["k"]
        reason = kernel_reason(ctx, "MultiHeadAttention", q)
        if reason:
            return Failure(reason)
        memo = _origin_memo(ctx.model)
        heads = _structure_reason(b, reshape, memo)
        if isinstance(heads, str):
            return Failure(heads)
        softmax = b["softmax"]
        axis = softmax.attr("axis", -1 if (softmax.version or 13) >= 13 else 1)
        if axis not in (-1, 3):
            return Failure(f"Softmax normalizes axis {axis}, not the last axis")
        factor = _scale(scale, b)
        if isinstance(factor, str):
            return Failure(factor)
        if mask in ("causal", "causal-add"):
            if not same_dim_ref((q, 1), (k, 1), memo):
                return Failure("a causal mask needs query and key of one provable length")
            reason = _causal_reason(b["causal"], b["fill"], q.shape.dims[1])
            if reason:
                return Failure(reason)
        if mask in ("add", "causal-add"):
            reason = _mask_reason(b["mask"], q)
            if reason:
                return Failure(reason)
        if guard and scalar_constant(b["zero"], 4) != 0.0:
            return Failure(f"the NaN guard writes '{b['zero'].name}', not 0")
        return True

    return check


# -- rewrite -----------------------------------------------------------------------------------------
def _bias_ready(mask: ir.Value, q: ir.Value, k: ir.Value, heads: int, memo: OriginMemo) -> bool:
    """True when ``mask`` already has the 4-D shape onnxruntime wants for ``attention_bias``."""
    shape = mask.shape
    if shape is None or shape.rank != 4:
        return False
    b0, b1, b2, b3 = shape.dims
    return (b0 == 1 or same_dim_ref((mask, 0), (q, 0), memo)) and b1 in (1, heads) \
        and same_dim_ref((mask, 2), (q, 1), memo) and same_dim_ref((mask, 3), (k, 1), memo)


def _sequence_length(op: Any, opset: int, x: ir.Value) -> ir.Value:
    """A 1-D int64 tensor holding ``x.shape[1]`` (a constant when it is static)."""
    dim = x.shape.dims[1]
    if isinstance(dim, int):
        return op.initializer(np.array([dim], dtype=np.int64), name_hint="seq_len")
    if opset >= 15:
        return op.Shape(x, start=1, end=2)
    one = op.initializer(np.array([1], dtype=np.int64), name_hint="one")
    two = op.initializer(np.array([2], dtype=np.int64), name_hint="two")
    return op.Slice(op.Shape(x), one, two)


def _attention_bias(op: Any, opset: int, mask: ir.Value, q: ir.Value, k: ir.Value) -> ir.Value:
    """``mask`` broadcast to ``[·, ·, S, L]`` (an ``Expand`` by ``[1, 1, S, L]``)."""
    s, length = q.shape.dims[1], k.shape.dims[1]
    if isinstance(s, int) and isinstance(length, int):
        target = op.initializer(np.array([1, 1, s, length], dtype=np.int64), name_hint="bias_shape")
    else:
        ones = op.initializer(np.array([1, 1], dtype=np.int64), name_hint="ones")
        target = op.Concat(ones, _sequence_length(op, opset, q), _sequence_length(op, opset, k), axis=0)
    return op.Expand(mask, target)


def _rewrite(scale: str, mask: str, reshape: bool, guard: bool) -> Callable[..., Any]:
    def rewrite(op: Any, **b: Any) -> Any:
        q, k, v = b["q"], b["k"], b["v"]
        memo = _origin_memo(op.graph.root_model())
        heads = _structure_reason(b, reshape, memo)
        factor = _scale(scale, b)
        assert not isinstance(heads, str) and not isinstance(factor, str), "checked"
        inputs: list[ir.Value | None] = [q, k, v]
        if mask in ("add", "causal-add"):
            bias = b["mask"]
            if not _bias_ready(bias, q, k, heads[0], memo):
                imports = op.graph.opset_imports()
                bias = _attention_bias(op, imports.get("", imports.get("ai.onnx", 1)), bias, q, k)
            inputs += [None, None, bias]
        unidirectional = 1 if mask in ("causal", "causal-add") else None
        out = op.MultiHeadAttention(*inputs, _domain=CONTRIB_DOMAIN, num_heads=heads[0], scale=float(factor),
                                    unidirectional=unidirectional)
        # [B, S, H] like the query: typed here because shape inference has no rule for the op.
        out.type = ir.TensorType(q.dtype, ir.Shape(q.shape.dims[:2] + (heads[0] * heads[1],)))
        if not _merges_heads(b, heads, memo):
            out = op.Reshape(out, b["out_shape"], **b["out_reshape"].attributes)
        if guard and mask in ("add", "causal-add") and _finite_reason(b["mask"]) is not None:
            # A row masked out entirely gives NaN probabilities, which the guard turned into 0, so
            # that row of the output was 0: keep the guard, on the (NaN) output row instead.
            zero = op.initializer(np.zeros((), dtype=ir.numpy_dtype(q.dtype)), name_hint="zero")
            nan = op.IsNaN(out)
            nan.type = ir.TensorType(onnx.TensorProto.BOOL, out.type.shape)
            guarded = op.Where(nan, zero, out)
            guarded.type = out.type
            out = guarded
        return out

    return rewrite


# -- normalizations: other spellings of the key transpose ----------------------------------------------
def _swapped_heads(op: Any, heads: Any) -> Any:
    return op.Transpose(heads, perm=(0, 1, 3, 2))


def _split_source(heads: ir.Value) -> ir.Value | None:
    """``x`` when ``heads = Transpose(x, [0, 2, 1, 3])``."""
    node = heads.producer
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") \
            or tuple(node.attr("perm", ()) or ()) != _HEAD_SPLIT:
        return None
    return node.inputs[0]


def _swapped_heads_check(ctx: MatchContext, heads: ir.Value) -> Any:
    return True if _split_source(heads) is not None else Failure(
        f"'{heads.name}' is not Transpose(x, perm=[0, 2, 1, 3]) (a head split)")


def _key_transpose(op: Any, heads: ir.Value) -> Any:
    # Read x directly: the split heads may have other (often dead) readers, e.g. Shape nodes.
    return op.Transpose(_split_source(heads), perm=list(_KEY_SPLIT_T))


def _flat_transpose(op: Any, heads: Any, flat_shape: Any, shape: Any) -> Any:
    flat = op.Reshape(heads, flat_shape, _name="flatten")
    return op.Reshape(op.Transpose(flat, perm=(0, 2, 1)), shape, _name="unflatten")


def _flat_transpose_check(ctx: MatchContext, heads: ir.Value, flatten: ir.Node, unflatten: ir.Node) -> Any:
    if _split_source(heads) is None:
        return Failure(f"'{heads.name}' is not Transpose(x, perm=[0, 2, 1, 3]) (a head split)")
    shape = heads.shape
    if shape is None or shape.rank != 4:
        return Failure(f"'{heads.name}' is not known to be 4-D")
    sizes = {name: dim for name, dim in zip("bnld", shape.dims) if isinstance(dim, int)}
    dims = DimLabels({heads: ("b", "n", "l", "d")}, sizes)
    reason = dims.reshape_reason(flatten, ("b", "n", "l", "d"), ("bn", "l", "d")) \
        or dims.reshape_reason(unflatten, ("bn", "d", "l"), ("b", "n", "d", "l"))
    return Failure(reason) if reason else True


def _finite_reason(value: ir.Value, depth: int = 0) -> str | None:
    """Why ``value`` may hold an infinity or NaN (``None`` when it provably cannot)."""
    array = constant_value(value)
    if array is not None:
        return None if array.dtype.kind in "biu" or np.all(np.isfinite(array)) else f"'{value.name}' is not finite"
    node = value.producer
    if node is None or depth > 8:
        return f"'{value.name}' is not provably finite"
    if node.op_type == "Where":
        return _finite_reason(node.inputs[1], depth + 1) or _finite_reason(node.inputs[2], depth + 1)
    source = node.inputs[0] if node.inputs else None
    if node.op_type in ("Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Identity") and source is not None:
        return _finite_reason(source, depth + 1)
    if node.op_type == "Cast" and source is not None and source.dtype is not None \
            and ir.numpy_dtype(source.dtype).kind in "biu":
        return None
    return f"'{value.name}' ({node.op_type}) is not provably finite"


def _rule_name(scale: str, mask: str, reshape: bool, guard: bool) -> str:
    return f"mha-{scale}-{mask}{'-reshaped' if reshape else ''}{'-guarded' if guard else ''}"


@functools.cache
def _mha_rule(scale: str, mask: str, reshape: bool, guard: bool) -> Rule:
    """The ``mha`` rule of one form (compiled once, on first use)."""
    return Rule(_rule_name(scale, mask, reshape, guard), _pattern(scale, mask, reshape, guard),
                _rewrite(scale, mask, reshape, guard), check=_check(scale, mask, reshape, guard), commute=True,
                benefit=2)


@functools.cache
def _normalization_rules() -> tuple[Rule, ...]:
    return (Rule("attention-key-transposes", _swapped_heads, _key_transpose, check=_swapped_heads_check),
            Rule("attention-key-flat-transpose", _flat_transpose, _key_transpose, check=_flat_transpose_check))


#: Every form ``(scale, mask, reshaped, guarded)`` an ``mha`` rule matches, in rule order.
_FORMS = tuple((scale, mask, reshape, guard) for guard in (False, True) for reshape in (False, True)
               for scale in SCALE_FORMS for mask in MASK_FORMS)


def _rules() -> RuleSet:
    return RuleSet([*_normalization_rules(), *(_mha_rule(*form) for form in _FORMS)])


@functools.cache
def attention_rules() -> RuleSet:
    """The rules of :class:`ContribAttention`: ``mha-<scale form>-<mask form>[-reshaped][-guarded]``
    and the normalizations ``attention-*`` that turn other spellings into the one the ``mha``
    rules match.

    Built on first use, not at import: compiling the 80 patterns takes a tenth of a second,
    which every ``graphopt`` command would pay even when no attention pass runs.
    """
    return _rules()


# -- which forms a graph holds -----------------------------------------------------------------------
def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The producer of ``value`` when it is a default-domain node of one of ``op_types``."""
    node = value.producer if value is not None else None
    if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _scale_forms(scores: ir.Value) -> set[str]:
    """The scale forms whose pattern may match the (scaled) product ``scores``."""
    node = _producer(scores, "Div", "Mul", "MatMul")
    if node is None:
        return set()
    if node.op_type == "Div":
        return {"div"} if _producer(node.inputs[0], "MatMul") else set()
    if node.op_type == "Mul":  # the pattern commutes Mul's inputs
        return {"mul"} if any(_producer(x, "MatMul") for x in node.inputs) else set()
    q_scaled, k_scaled = (_producer(x, "Mul") is not None for x in node.inputs[:2])
    forms = {"none"}
    if q_scaled:
        forms.add("prescale-qk" if k_scaled else "prescale-q")
    return forms


def _forms_at(root: ir.Node) -> set[tuple[str, str, bool, bool]]:
    """The forms ``(scale, mask, reshaped, guarded)`` whose ``mha`` pattern may match at ``root``.

    Reads only the op types along the context, probabilities and scores, so it costs a few
    dict lookups per Reshape; the rules of other forms cannot match there (their patterns need
    other op types at these places), so leaving them out changes nothing but the time.
    """
    merged = _producer(root.inputs[0] if root.inputs else None, "Transpose")
    if merged is None:
        return set()
    context = _producer(merged.inputs[0], "MatMul", "Reshape")
    reshape = context is not None and context.op_type == "Reshape"
    if reshape:
        context = _producer(context.inputs[0], "MatMul")
    if context is None:
        return set()
    probs = _producer(context.inputs[0], "Softmax", "Where")
    guard = probs is not None and probs.op_type == "Where"
    if guard:
        probs = _producer(probs.inputs[2], "Softmax") if _producer(probs.inputs[0], "IsNaN") else None
    if probs is None:
        return set()
    scores = probs.inputs[0]
    candidates = [(scores, "none")]
    masked = _producer(scores, "Add", "Where")
    if masked is not None and masked.op_type == "Where":
        candidates.append((masked.inputs[1], "causal"))
    elif masked is not None:  # the pattern commutes Add's inputs
        for x in masked.inputs:
            candidates.append((x, "add"))
            causal = _producer(x, "Where")
            if causal is not None:
                candidates.append((causal.inputs[1], "causal-add"))
    return {(scale, mask, reshape, guard) for value, mask in candidates for scale in _scale_forms(value)}


def _forms_in(model: ir.Model) -> set[tuple[str, str, bool, bool]]:
    """The attention forms present anywhere in ``model`` (every graph, subgraph and function)."""
    forms: set[tuple[str, str, bool, bool]] = set()
    for node in model.all_nodes():
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            forms |= _forms_at(node)
    return forms


def __getattr__(name: str) -> Any:
    if name == "ATTENTION_RULES":  # built lazily (see ``attention_rules``)
        return attention_rules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ContribAttention(RewritePass):
    """Fuse exported multi-head attention blocks into com.microsoft MultiHeadAttention.

    Example:
        >>> ContribAttention().run(model, PassContext()).counters  # doctest: +SKIP
        {'mha-one-transpose-div-add': 12}
    """

    name = "contrib-attention"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    description = ("Fuse exported multi-head attention blocks into com.microsoft MultiHeadAttention "
                   "(rules mha-<scale>-<mask>[-reshaped][-guarded], attention-key-transposes, "
                   "attention-key-flat-transpose).")

    @classmethod
    def rule_set(cls) -> RuleSet:
        """The attention rules (see :func:`attention_rules`), or a subclass's own ``rules``."""
        return super().rule_set() if cls.rules else attention_rules()

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the normalizations and the ``mha`` rules of the forms ``model`` holds.

        A rule is tried at every node of its root op type, and all 80 ``mha`` rules have a
        ``Reshape`` root: trying them all at every Reshape of a BERT-base export cost 6,500
        match attempts (0.6 s). One cheap scan finds which forms occur, and only their rules run
        (one or two per model), each exactly as it would within the full set.
        """
        if type(self).rules:
            return super().run(model, ctx)
        forms = sorted(_forms_in(model), key=_FORMS.index)
        logger.debug("attention forms found: %s", [_rule_name(*form) for form in forms])
        rules = RuleSet([*_normalization_rules(), *(_mha_rule(*form) for form in forms)])
        model.meta[_MEMO_KEY] = {}
        try:
            counts = apply_rules(model, rules, ctx)
        finally:
            model.meta.pop(_MEMO_KEY, None)
        return PassResult(changed=sum(counts.values()) > 0, counters=counts)
