"""Types, attributes and tensors: equality, sizes, and storage-independent digests."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir

FLOAT = TensorProto.FLOAT
A = onnx.AttributeProto


# -- types -------------------------------------------------------------------------------------------

def test_shape_equality_and_hash() -> None:
    assert ir.Shape([1, "N", None]) == ir.Shape((1, "N", None))
    assert ir.Shape([1, "N"]) == (1, "N") and ir.Shape([1, "N"]) == [1, "N"]
    assert ir.Shape([1, "N"]) != ir.Shape([1, "M"])
    assert ir.Shape([1, 2]) != ir.Shape([1, 2, 1])
    assert ir.Shape([]) != ir.Shape([1])
    assert hash(ir.Shape([3, "N"])) == hash(ir.Shape((3, "N")))
    assert len({ir.Shape([3, "N"]), ir.Shape([3, "N"]), ir.Shape([3])}) == 2


def test_shape_queries() -> None:
    static = ir.Shape([2, 3, 4])
    assert static.rank == 3 and static.is_static() and static.numel() == 24
    assert list(static) == [2, 3, 4] and static[1] == 3 and len(static) == 3
    symbolic = ir.Shape(["N", 3])
    assert not symbolic.is_static() and symbolic.numel() is None
    scalar = ir.Shape([])
    assert scalar.rank == 0 and scalar.is_static() and scalar.numel() == 1


def test_shape_proto_round_trip_with_unknown_dims() -> None:
    shape = ir.Shape([4, "batch", None])
    proto = shape.to_proto()
    assert [d.WhichOneof("value") for d in proto.dim] == ["dim_value", "dim_param", None]
    back = ir.Shape.from_proto(proto)
    assert back == shape and back.to_proto() is proto


def test_tensor_type_equality() -> None:
    assert ir.TensorType(FLOAT, [2, "N"]) == ir.TensorType(FLOAT, ir.Shape([2, "N"]))
    assert ir.TensorType(FLOAT, [2]) != ir.TensorType(TensorProto.DOUBLE, [2])
    assert ir.TensorType(FLOAT, [2]) != ir.TensorType(FLOAT, [3])
    # Unknown rank is not a scalar.
    assert ir.TensorType(FLOAT, None) != ir.TensorType(FLOAT, [])
    assert hash(ir.TensorType(FLOAT, [2, "N"])) == hash(ir.TensorType(FLOAT, [2, "N"]))
    assert str(ir.TensorType(FLOAT, ["N", None, 3])) == "float[N,?,3]"
    assert ir.TensorType(FLOAT, [2]) != ir.OtherType(helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(FLOAT, [2])))


def test_tensor_type_ignores_how_it_was_read() -> None:
    proto = helper.make_tensor_type_proto(FLOAT, ["N", 3])
    proto.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    from graphopt.ir._types import type_from_proto

    read = type_from_proto(proto)
    assert read == ir.TensorType(FLOAT, ["N", 3])
    assert read.to_proto() is proto  # written back with its denotation
    fresh = ir.TensorType(FLOAT, ["N", 3]).to_proto()
    assert fresh == helper.make_tensor_type_proto(FLOAT, ["N", 3])


def test_other_type_equality() -> None:
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(FLOAT, ["N"]))
    seq2 = helper.make_sequence_type_proto(helper.make_tensor_type_proto(FLOAT, ["N"]))
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(FLOAT, ["N"]))
    assert ir.OtherType(seq) == ir.OtherType(seq2)
    assert hash(ir.OtherType(seq)) == hash(ir.OtherType(seq2))
    assert ir.OtherType(seq) != ir.OtherType(opt)
    assert ir.OtherType(seq).kind == "sequence_type" and ir.OtherType(opt).kind == "optional_type"


def test_value_type_shortcuts() -> None:
    v = ir.Value("v", ir.TensorType(TensorProto.INT64, ["N"]))
    assert v.dtype == TensorProto.INT64 and v.shape == ("N",)
    const = ir.Value("c", const_value=ir.ArrayTensor(np.zeros((2, 3), np.float16)))
    assert const.dtype == TensorProto.FLOAT16 and const.shape == (2, 3)
    assert ir.Value("u").dtype is None and ir.Value("u").shape is None
    assert ir.tensor_type_of(np.zeros((4, 1), np.int8)) == ir.TensorType(TensorProto.INT8, [4, 1])


def test_dtype_helpers() -> None:
    assert ir.dtype_name(FLOAT) == "float" and ir.dtype_name(TensorProto.BFLOAT16) == "bfloat16"
    assert ir.numpy_dtype(TensorProto.FLOAT16) == np.float16
    assert ir.numpy_dtype(TensorProto.FLOAT8E4M3FN) == ml_dtypes.float8_e4m3fn


# -- attributes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, attr_type, stored", [
    (3, A.INT, 3), (True, A.INT, 1), (np.int64(5), A.INT, 5),
    (0.1, A.FLOAT, float(np.float32(0.1))), ("s", A.STRING, "s"),
    ([1, 2], A.INTS, (1, 2)), ((0.5, 1), A.FLOATS, (0.5, 1.0)), (["a", "b"], A.STRINGS, ("a", "b")),
])
def test_attr_from_value_infers_type(value, attr_type: int, stored) -> None:
    attr = ir.Attr.from_value("a", value)
    assert attr.type == attr_type and attr.value == stored
    proto = attr.to_proto()
    assert helper.get_attribute_value(proto) == helper.get_attribute_value(
        helper.make_attribute("a", value))


def test_attr_from_value_tensor_and_graph() -> None:
    attr = ir.Attr.from_value("value", np.arange(3, dtype=np.int64))
    assert attr.type == A.TENSOR and isinstance(attr.value, ir.ArrayTensor)
    np.testing.assert_array_equal(numpy_helper.to_array(attr.to_proto().t), np.arange(3))
    graph = ir.Graph("body")
    assert ir.Attr.from_value("body", graph).type == A.GRAPH
    with pytest.raises(TypeError, match="empty list"):
        ir.Attr.from_value("empty", [])
    assert ir.Attr.from_value("empty", [], type=A.INTS).value == ()


def test_node_set_attr_and_attr() -> None:
    node = ir.Node("", "Concat", [], attributes={"axis": 1})
    assert node.attr("axis") == 1 and node.attr("missing", "dflt") == "dflt"
    node.set_attr("axis", 2)
    assert node.attributes["axis"].type == A.INT and node.attr("axis") == 2
    node.set_attr("pads", [0, 0], type=A.INTS)
    assert node.attr("pads") == (0, 0)


# -- tensors ---------------------------------------------------------------------------------------

def _storages(values: np.ndarray, dtype: int) -> dict[str, ir.Tensor]:
    """The same values as every kind of tensor and proto storage."""
    raw = numpy_helper.from_array(values, "t")
    assert raw.data_type == dtype
    assert raw.HasField("raw_data") or dtype == TensorProto.STRING
    flat = values.reshape(-1)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        typed_values = flat.astype(np.int32).tolist()
    elif dtype in (TensorProto.FLOAT16, TensorProto.BFLOAT16) or "float8" in str(values.dtype):
        typed_values = flat.astype(np.float32).tolist()
    else:
        typed_values = flat.tolist()
    typed = helper.make_tensor("t", dtype, values.shape, typed_values)
    assert not typed.HasField("raw_data")
    np.testing.assert_array_equal(numpy_helper.to_array(typed), values)
    return {
        "proto_raw": ir.ProtoTensor(raw),
        "proto_typed": ir.ProtoTensor(typed),
        "array": ir.ArrayTensor(values, name="other_name"),
        "lazy": ir.LazyTensor(lambda: values, dtype, values.shape),
    }


_CASES = {
    "float": (np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4), FLOAT),
    "double": (np.array([[0.1, -7.5]], np.float64), TensorProto.DOUBLE),
    "float16": (np.array([1.5, -0.25, 65504], np.float16), TensorProto.FLOAT16),
    "bfloat16": (np.array([1.5, -0.25, 3.0], ml_dtypes.bfloat16), TensorProto.BFLOAT16),
    "float8e4m3fn": (np.array([0.5, -2.0, 448], ml_dtypes.float8_e4m3fn), TensorProto.FLOAT8E4M3FN),
    "float8e5m2": (np.array([0.5, -2.0], ml_dtypes.float8_e5m2), TensorProto.FLOAT8E5M2),
    "int4": (np.array([[1, -2, 3], [-8, 7, 0]], ml_dtypes.int4), TensorProto.INT4),
    "uint4": (np.array([1, 15, 3, 0, 9], ml_dtypes.uint4), TensorProto.UINT4),
    "int8": (np.array([-128, 0, 127], np.int8), TensorProto.INT8),
    "int64": (np.array([[1, -2], [3, 2**40]], np.int64), TensorProto.INT64),
    "uint64": (np.array([2**63 + 5], np.uint64), TensorProto.UINT64),
    "bool": (np.array([True, False, True]), TensorProto.BOOL),
    "string": (np.array(["ab", "", "\u00e9"], dtype=object), TensorProto.STRING),
    "scalar": (np.array(3.5, np.float32), FLOAT),
    "empty": (np.zeros((0, 3), np.float32), FLOAT),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_tensor_kinds_agree_on_everything(case: str) -> None:
    values, dtype = _CASES[case]
    tensors = _storages(values, dtype)
    digests = {name: t.digest() for name, t in tensors.items()}
    assert len(set(digests.values())) == 1, digests
    for name, t in tensors.items():
        assert t.dtype == dtype, name
        assert tuple(t.shape) == values.shape, name
        assert t.size == values.size, name
        assert t.nbytes == tensors["proto_raw"].nbytes, name
        np.testing.assert_array_equal(np.asarray(t.numpy()), values)
        back = numpy_helper.to_array(t.to_proto())
        np.testing.assert_array_equal(back, values)
    if dtype != TensorProto.STRING:
        assert tensors["proto_raw"].nbytes == len(numpy_helper.from_array(values).raw_data)
        for t in tensors.values():
            assert len(b"".join(t.iter_bytes())) == t.nbytes


def test_digest_depends_on_dtype_shape_and_values_not_name() -> None:
    base = np.arange(6, dtype=np.float32)
    d = ir.ArrayTensor(base, name="a").digest()
    assert ir.ArrayTensor(base, name="b").digest() == d
    assert ir.ArrayTensor(base.reshape(2, 3)).digest() != d
    assert ir.ArrayTensor(base.view(np.int32)).digest() != d  # same bytes, other dtype
    changed = base.copy()
    changed[5] = 7
    assert ir.ArrayTensor(changed).digest() != d
    strings_a = ir.LazyTensor(lambda: np.array([b"xy", b"z"], dtype=object), TensorProto.STRING, (2,))
    strings_b = ir.LazyTensor(lambda: np.array([b"x", b"yz"], dtype=object), TensorProto.STRING, (2,))
    assert strings_a.digest() != strings_b.digest()


def test_digest_of_custom_tensor_subclass_is_storage_independent() -> None:
    class Ones(ir.Tensor):
        dtype = FLOAT
        shape = (3,)

        def numpy(self) -> np.ndarray:
            return np.ones(3, np.float32)

        def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
            return numpy_helper.from_array(self.numpy(), self.name)

    assert Ones("one").digest() == Ones("two").digest() == ir.ArrayTensor(np.ones(3, np.float32)).digest()


@pytest.mark.parametrize("dtype, shape, expected", [
    (TensorProto.INT4, (5,), 3), (TensorProto.INT4, (4,), 2), (TensorProto.UINT4, (2, 3), 3),
    (TensorProto.UINT4, (1,), 1), (TensorProto.INT4, (0,), 0), (TensorProto.FLOAT4E2M1, (7,), 4),
    (FLOAT, (2, 3), 24), (TensorProto.BFLOAT16, (3,), 6), (TensorProto.FLOAT8E4M3FN, (5,), 5),
    (TensorProto.BOOL, (4,), 4), (TensorProto.COMPLEX128, (2,), 32), (FLOAT, (), 4),
])
def test_sub_byte_and_other_nbytes(dtype: int, shape: tuple[int, ...], expected: int) -> None:
    lazy = ir.LazyTensor(lambda: np.zeros(shape), dtype, shape)
    assert lazy.nbytes == expected
    proto = helper.make_tensor("t", dtype, shape, [0] * int(np.prod(shape)))
    assert ir.ProtoTensor(proto).nbytes == expected


def test_lazy_tensor_computes_once_and_only_when_read() -> None:
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.full((2, 2), 3, np.int32)

    lazy = ir.LazyTensor(compute, TensorProto.INT32, (2, 2), name="lazy")
    assert lazy.dtype == TensorProto.INT32 and lazy.shape == (2, 2) and lazy.nbytes == 16
    assert calls == []
    lazy.numpy()
    lazy.digest()
    lazy.to_proto()
    assert calls == [1]
    assert lazy.to_proto().name == "lazy"


def test_array_tensor_with_explicit_dtype() -> None:
    bits = np.array([1.0, 2.0], np.float32)
    t = ir.ArrayTensor(bits, dtype=TensorProto.BFLOAT16)
    assert t.dtype == TensorProto.BFLOAT16 and t.nbytes == 4
    proto = t.to_proto()
    assert proto.data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.float32), bits)
    assert len(b"".join(t.iter_bytes())) == 4
    assert t.digest() == ir.ArrayTensor(bits.astype(ml_dtypes.bfloat16)).digest()


def test_proto_tensor_rename_does_not_touch_the_read_proto() -> None:
    proto = numpy_helper.from_array(np.ones(2, np.float32), "w")
    t = ir.ProtoTensor(proto)
    assert t.to_proto() is proto
    t.name = "renamed"
    assert t.to_proto().name == "renamed" and proto.name == "w"


def test_sparse_tensor() -> None:
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([1, 5], np.int64), "")
    sparse = ir.SparseTensor(helper.make_sparse_tensor(values, indices, [2, 3]))
    assert sparse.dtype == FLOAT and sparse.shape == (2, 3)
    np.testing.assert_array_equal(sparse.numpy(), [[0, 1.5, 0], [0, 0, -2.0]])
    assert sparse.to_proto("sp").values.name == "sp"
    assert sparse.to_proto("other").values.name == "other"
