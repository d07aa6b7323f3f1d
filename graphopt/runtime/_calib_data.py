"""Calibration data: feeds read from files, produced by user code, or generated.

Every source is re-iterable (each pass over it reads the data again instead of keeping it), so
the calibrator can make several passes with bounded memory. Feeds are checked against the
model's declared inputs as they are read: a missing or unknown name, a wrong element type or
rank, or a wrong fixed dim is reported with the sample it came from.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError

__all__ = [
    "CalibrationSource",
    "InputSpec",
    "load_callable",
    "model_inputs",
    "open_calibration_data",
    "split_held_out",
]

logger = logging.getLogger(__name__)

#: Samples a synthetic source yields when ``samples`` is not given.
DEFAULT_SYNTHETIC_SAMPLES = 32


@dataclass(frozen=True)
class InputSpec:
    """A declared graph input: name, numpy dtype and dims (int, or a str/None for symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        """e.g. ``input_ids: int64[batch,seq]``."""
        dims = "?" if self.dims is None else ",".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.name}: {self.dtype}[{dims}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are no initializer)."""
    inits = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise GraphoptError(f"model input '{vi.name}' is not a tensor; calibration feeds tensors only")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def check_feed(feed: Any, inputs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Check one sample against the declared inputs; returns it as numpy arrays.

    Raises:
        GraphoptError: not a dict, a missing or unknown name, a wrong dtype, rank or fixed dim.
    """
    if not isinstance(feed, Mapping):
        raise GraphoptError(f"{where}: a calibration sample must be a dict of input name -> array, "
                            f"got {type(feed).__name__}")
    names = [i.name for i in inputs]
    unknown = sorted(set(feed) - set(names))
    if unknown:
        raise GraphoptError(f"{where}: '{unknown[0]}' is not an input of the model (inputs: {', '.join(names)})")
    checked: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in feed:
            raise GraphoptError(f"{where}: input '{spec.name}' is missing (the model needs "
                                f"{', '.join(i.describe() for i in inputs)})")
        arr = np.asarray(feed[spec.name])
        if arr.dtype != spec.dtype:
            raise GraphoptError(f"{where}: input '{spec.name}' is {arr.dtype} but the model expects "
                                f"{spec.dtype}; convert it with array.astype(np.{spec.dtype})")
        if spec.dims is not None:
            if arr.ndim != len(spec.dims):
                raise GraphoptError(f"{where}: input '{spec.name}' has shape {list(arr.shape)} but the "
                                    f"model expects rank {len(spec.dims)} ({spec.describe()})")
            for axis, (dim, size) in enumerate(zip(spec.dims, arr.shape)):
                if isinstance(dim, int) and dim > 0 and dim != size:
                    raise GraphoptError(f"{where}: input '{spec.name}' has size {size} on axis {axis}, "
                                        f"the model fixes it to {dim} ({spec.describe()})")
        checked[spec.name] = arr
    return checked


class CalibrationSource:
    """A re-iterable source of calibration feeds (dicts of input name -> array).

    Each iteration reads the data again, so memory does not grow with the number of samples.
    ``len()`` counts samples when their number is not known in advance: it reads file headers,
    or iterates user code once (a one-shot iterator is then kept in memory to be counted).

    Attributes:
        description: where the data comes from, for messages and reports.
        synthetic: True when the data is generated (accuracy is not assured).

    Example:
        >>> source = open_calibration_data("calib/", model=model)  # doctest: +SKIP
        >>> len(source), next(iter(source)).keys()  # doctest: +SKIP
        (100, dict_keys(['input']))
    """

    def __init__(self, factory: Callable[[], Iterator[Any]], *, description: str,
                 inputs: list[InputSpec], synthetic: bool = False, length: int | None = None,
                 limit: int | None = None, counter: Callable[[], int] | None = None,
                 one_shot: bool = False) -> None:
        self._factory = factory
        self.description = description
        self.synthetic = synthetic
        self.inputs = inputs
        self._length = length
        self._limit = limit
        self._counter = counter
        self._one_shot = one_shot
        self._consumed = False

    def _raw(self) -> Iterator[Any]:
        if self._one_shot:
            if self._consumed:
                raise GraphoptError(f"{self.description} can be read only once; pass a list, a "
                                    "folder, or a callable that returns a new iterator on each call")
            self._consumed = True
        items = self._factory()
        return itertools.islice(items, self._limit) if self._limit is not None else items

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        count = 0
        for count, feed in enumerate(self._raw(), 1):
            yield check_feed(feed, self.inputs, f"{self.description}, sample {count}")
        if self._one_shot:
            self._length = count
        if count == 0:
            raise GraphoptError(f"{self.description} yielded no samples")

    def __len__(self) -> int:
        if self._length is None:
            if self._one_shot:
                self._buffer_one_shot()
            else:
                self._length = self._counter() if self._counter is not None else sum(1 for _ in self._factory())
        assert self._length is not None
        return self._length if self._limit is None else min(self._length, self._limit)

    def _buffer_one_shot(self) -> None:
        """Count a one-shot iterator by reading it into memory (it becomes re-iterable)."""
        if self._consumed:
            raise GraphoptError(f"{self.description} was read partly; its length is unknown")
        logger.warning("%s is a one-shot iterator: counting its samples keeps them all in memory; "
                       "pass a callable that returns a new iterator to stream them", self.description)
        buffered = list(self._raw())
        self._consumed = False
        self._one_shot = False
        self._limit = None
        self._factory = lambda: iter(buffered)
        self._length = len(buffered)

    @property
    def one_shot(self) -> bool:
        """True when the source can be iterated only once (a generator given directly)."""
        return self._one_shot

    def __repr__(self) -> str:
        return f"CalibrationSource({self.description!r}, synthetic={self.synthetic})"


# -- files --------------------------------------------------------------------------------------------
def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Array shapes in an ``.npz`` without reading the data."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
                shapes[member[:-4]] = shape
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise GraphoptError(f"calibration file '{path}' is not a readable .npz archive ({exc})") from None
    return shapes


def _stack_length(shapes: Mapping[str, tuple[int, ...]], inputs: list[InputSpec], path: str) -> int | None:
    """``N`` when every array has one leading axis more than its input (a stack of N samples)."""
    ranks = {i.name: len(i.dims) for i in inputs if i.dims is not None}
    stacked = {name: len(shape) == ranks[name] + 1 for name, shape in shapes.items() if name in ranks}
    if not stacked or not any(stacked.values()):
        return None
    if not all(stacked.values()):
        raise GraphoptError(f"calibration file '{path}': some arrays have a leading sample axis and some "
                            "do not; stack every input the same way (shape [N, *input_shape])")
    lengths = {shapes[name][0] for name in stacked}
    if len(lengths) != 1:
        raise GraphoptError(f"calibration file '{path}': stacked arrays hold different numbers of samples "
                            f"({sorted(lengths)}); give every input the same leading size")
    return lengths.pop()


def _npz_samples(path: str, inputs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    stack = _stack_length(_npz_shapes(path), inputs, path)
    with np.load(path, allow_pickle=False) as data:
        if stack is None:
            yield {name: data[name] for name in data.files}
            return
        arrays = {name: data[name] for name in data.files}
    for i in range(stack):
        yield {name: arr[i] for name, arr in arrays.items()}


def _npy_samples(path: str, inputs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    if len(inputs) != 1:
        raise GraphoptError(f"calibration file '{path}' is a single .npy array but the model has "
                            f"{len(inputs)} inputs; save each sample as an .npz with one array per input")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise GraphoptError(f"calibration file '{path}' is not a readable .npy array ({exc})") from None
    spec = inputs[0]
    if spec.dims is not None and arr.ndim == len(spec.dims) + 1:
        for row in arr:
            yield {spec.name: row}
    else:
        yield {spec.name: arr}


def _file_count(path: str, inputs: list[InputSpec]) -> int:
    if path.endswith(".npz"):
        return _stack_length(_npz_shapes(path), inputs, path) or 1
    spec = inputs[0] if len(inputs) == 1 else None
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        except ValueError as exc:
            raise GraphoptError(f"calibration file '{path}' is not a readable .npy array ({exc})") from None
    if spec is not None and spec.dims is not None and len(shape) == len(spec.dims) + 1:
        return shape[0]
    return 1


def _folder_source(folder: str, inputs: list[InputSpec]) -> CalibrationSource:
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.endswith((".npz", ".npy")) and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise GraphoptError(f"calibration folder '{folder}' holds no .npz or .npy files; save one "
                            "sample per file with numpy.savez(path, input_name=array, ...)")

    def factory() -> Iterator[dict[str, np.ndarray]]:
        for path in files:
            yield from (_npz_samples(path, inputs) if path.endswith(".npz") else _npy_samples(path, inputs))

    return CalibrationSource(factory, description=f"calibration folder '{folder}'", inputs=inputs,
                             counter=lambda: sum(_file_count(p, inputs) for p in files))


def _npz_source(path: str, inputs: list[InputSpec]) -> CalibrationSource:
    stack = _stack_length(_npz_shapes(path), inputs, path)
    return CalibrationSource(lambda: _npz_samples(path, inputs), description=f"calibration file '{path}'",
                             inputs=inputs, length=stack or 1)


# -- user code ----------------------------------------------------------------------------------------
def load_callable(spec: str, *, what: str = "function") -> Callable[..., Any]:
    """Import ``module:function`` (or ``path/to/file.py:function``) and return the callable.

    A module that is not found on ``sys.path`` is also looked for in the current folder.

    Raises:
        GraphoptError: no ``:``, the module cannot be imported, or the name is missing or not callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise GraphoptError(f"'{spec}' is not MODULE:FUNCTION (for example mypkg.data:calibration_feeds)")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise GraphoptError(f"{what} '{spec}': file '{module_name}' does not exist")
            unique = f"_graphopt_user_{abs(hash(os.path.abspath(module_name)))}"
            module_spec = importlib.util.spec_from_file_location(unique, module_name)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())
                try:
                    module = importlib.import_module(module_name)
                finally:
                    sys.path.remove(os.getcwd())
    except GraphoptError:
        raise
    except Exception as exc:  # user code may raise anything while importing
        raise GraphoptError(f"{what} '{spec}': cannot import '{module_name}' "
                            f"({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise GraphoptError(f"{what} '{spec}': module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise GraphoptError(f"{what} '{spec}': '{attr}' is not callable")
    return fn


def _callable_source(fn: Callable[[], Any], description: str, inputs: list[InputSpec]) -> CalibrationSource:
    def factory() -> Iterator[Any]:
        try:
            produced = fn()
        except Exception as exc:  # user code may raise anything
            raise GraphoptError(f"{description} raised {type(exc).__name__}: {exc}") from None
        if isinstance(produced, Mapping):
            raise GraphoptError(f"{description} returned one dict; it must return or yield an "
                                "iterable of dicts (one per sample)")
        try:
            return iter(produced)
        except TypeError:
            raise GraphoptError(f"{description} returned {type(produced).__name__}, not an iterable "
                                "of dicts") from None

    return CalibrationSource(factory, description=description, inputs=inputs)


# -- synthetic ----------------------------------------------------------------------------------------
def _gather_rows(model: onnx.ModelProto) -> dict[str, int]:
    """For inputs used directly as Gather indices: the number of rows they index."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            data_shape = shapes.get(node.input[0])
            if data_shape:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                size = data_shape[axis]
                rows[node.input[1]] = min(rows.get(node.input[1], size), size)
    return rows


def _synthetic_source(model: onnx.ModelProto, inputs: list[InputSpec], samples: int, seed: int,
                      dims: Mapping[str, int]) -> CalibrationSource:
    rows = _gather_rows(model)

    def factory() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            feed = {}
            for spec in inputs:
                if spec.dims is None:
                    raise GraphoptError(f"input '{spec.name}' has no declared shape; synthetic data "
                                        "needs one (give calibration data instead)")
                shape = [d if isinstance(d, int) and d > 0 else dims.get(str(d), 1) for d in spec.dims]
                if spec.dtype == np.bool_:
                    arr = rng.random(shape) > 0.5
                elif spec.dtype.kind == "f":
                    arr = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype.kind in "iu":
                    if spec.name in rows:  # ids: anywhere in the table they index
                        arr = rng.integers(0, rows[spec.name], size=shape)
                    elif "mask" in spec.name.lower():
                        arr = np.ones(shape)
                    else:
                        arr = rng.integers(0, 2, size=shape)
                    arr = arr.astype(spec.dtype)
                else:
                    raise GraphoptError(f"cannot generate input '{spec.name}' of type {spec.dtype}; "
                                        "give calibration data instead")
                feed[spec.name] = np.asarray(arr)
            yield feed

    return CalibrationSource(factory, description="synthetic calibration data", inputs=inputs,
                             synthetic=True, length=samples)


# -- entry points -------------------------------------------------------------------------------------
def open_calibration_data(spec: Any, *, model: onnx.ModelProto, samples: int | None = None,
                          seed: int = 0, dims: Mapping[str, int] | None = None) -> CalibrationSource:
    """Open calibration data for ``model``.

    Args:
        spec: one of

            - a folder of ``.npz`` files (keys = input names) or ``.npy`` files (single-input
              models only), read in name order;
            - one ``.npz`` file; an array with one leading axis more than its input is a stack
              of samples;
            - ``"module:function"`` or ``"file.py:function"``: called with no arguments on each
              pass, it returns or yields dicts of input name -> array;
            - a Python callable of the same kind, a list/tuple of dicts, or any iterable (a
              generator can be read only once);
            - ``"synthetic"``: seeded random feeds (floats N(0, 1), integer ids within the rows
              of the table a Gather indexes with them, masks of ones); accuracy is not assured.
        model: the model the feeds are for (its inputs are checked).
        samples: use at most this many samples (synthetic: how many to generate, default 32).
        seed: seed of synthetic data.
        dims: sizes of symbolic input dims for synthetic data (others are 1).

    Raises:
        GraphoptError: a missing path, an empty folder, an import failure, or a first sample
            that does not fit the model's inputs.

    Example:
        >>> source = open_calibration_data("calib.npz", model=onnx.load("m.onnx"))  # doctest: +SKIP
    """
    inputs = model_inputs(model)
    if samples is not None and samples < 1:
        raise GraphoptError(f"samples={samples}: calibrate with at least one sample")
    source: CalibrationSource
    if isinstance(spec, CalibrationSource):
        source = copy.copy(spec)  # a limit set below must not change the caller's source
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text == "synthetic":
            logger.warning("calibrating on synthetic (random) inputs: the quantized model's accuracy is "
                           "not assured; give real calibration data (--calibration DIR|FILE.npz|module:fn)")
            return _synthetic_source(model, inputs, samples or DEFAULT_SYNTHETIC_SAMPLES, seed, dict(dims or {}))
        if os.path.isdir(text):
            source = _folder_source(text, inputs)
        elif os.path.isfile(text):
            if text.endswith(".npz"):
                source = _npz_source(text, inputs)
            elif text.endswith(".npy"):
                source = CalibrationSource(lambda: _npy_samples(text, inputs), inputs=inputs,
                                           description=f"calibration file '{text}'",
                                           counter=lambda: _file_count(text, inputs))
            else:
                raise GraphoptError(f"calibration file '{text}' is neither .npz nor .npy; give a folder of "
                                    ".npz files, one .npz, MODULE:FUNCTION or 'synthetic'")
        elif ":" in text and not text.endswith((".npz", ".npy")):
            fn = load_callable(text, what="calibration data")
            source = _callable_source(fn, f"calibration data '{text}'", inputs)
        else:
            raise GraphoptError(f"calibration data '{text}' does not exist; give a folder of .npz files, "
                                "one .npz, MODULE:FUNCTION or 'synthetic'")
    elif callable(spec):
        source = _callable_source(spec, f"calibration data {getattr(spec, '__name__', 'callable')}()", inputs)
    elif isinstance(spec, Mapping):
        source = CalibrationSource(lambda: iter([spec]), description="calibration feed", inputs=inputs, length=1)
    elif isinstance(spec, (list, tuple)):
        items = spec
        source = CalibrationSource(lambda: iter(items), description="calibration list", inputs=inputs,
                                   length=len(items))
    elif isinstance(spec, Iterable):
        iterator = iter(spec)
        if iterator is not spec:  # re-iterable container
            source = CalibrationSource(lambda: iter(spec), description="calibration iterable", inputs=inputs)
        else:
            # Peek once to check the first sample, then chain it back in front.
            first = next(iterator, None)
            if first is None:
                raise GraphoptError("the calibration iterator yielded no samples")
            check_feed(first, inputs, "calibration iterator, sample 1")
            return CalibrationSource(lambda: itertools.chain([first], iterator), inputs=inputs,
                                     description="calibration iterator", one_shot=True, limit=samples)
    else:
        raise GraphoptError(f"cannot read calibration data from {type(spec).__name__}; give a folder, an "
                            ".npz file, MODULE:FUNCTION, a callable, a list of dicts or 'synthetic'")
    if samples is not None:
        source._limit = samples if source._limit is None else min(source._limit, samples)
    first = next(iter(source._raw()), None)
    if first is None:
        raise GraphoptError(f"{source.description} yielded no samples")
    check_feed(first, inputs, f"{source.description}, sample 1")
    return source


class _Subset(CalibrationSource):
    """The samples of another source whose index is in ``[start, stop)``."""

    def __init__(self, parent: CalibrationSource, start: int, stop: int) -> None:
        super().__init__(lambda: itertools.islice(parent._raw(), start, stop),
                         description=parent.description, inputs=parent.inputs,
                         synthetic=parent.synthetic, length=stop - start)


def split_held_out(source: CalibrationSource, held_out: float
                   ) -> tuple[CalibrationSource, list[dict[str, np.ndarray]]]:
    """Set the last samples of ``source`` apart for evaluation.

    Args:
        source: a re-iterable source.
        held_out: how many samples (an int), or which fraction of them (a float in (0, 1)).

    Returns:
        The source of the remaining samples, and the held-out feeds (read into memory).

    Raises:
        GraphoptError: a one-shot source, or a split that leaves no sample on one side.

    Example:
        >>> calib, held = split_held_out(source, 0.1)  # doctest: +SKIP
    """
    if source.one_shot:
        raise GraphoptError(f"{source.description} can be read only once and cannot be split; pass a "
                            "list, a folder or a callable")
    total = len(source)
    if isinstance(held_out, float) and 0 < held_out < 1:
        count = max(1, round(total * held_out))
    elif float(held_out) == int(held_out):
        count = int(held_out)
    else:
        raise GraphoptError(f"held_out={held_out}: give a count or a fraction in (0, 1)")
    if count < 1 or count >= total:
        raise GraphoptError(f"cannot hold out {count} of {total} samples of {source.description}; keep at "
                            "least one on each side (give more data or a smaller held_out)")
    calibration = _Subset(source, 0, total - count)
    held = [check_feed(f, source.inputs, f"{source.description}, sample {total - count + i + 1}")
            for i, f in enumerate(itertools.islice(source._raw(), total - count, total))]
    return calibration, held
