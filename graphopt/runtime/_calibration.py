"""Streaming calibration: ranges of intermediate tensors, with memory independent of the sample count.

How it runs: the requested tensors are added as outputs to a copy of the model, which
onnxruntime runs (graph optimizations off, so every requested tensor exists) sample by sample;
each sample's outputs are reduced into per-tensor :class:`TensorStatistics` at once and dropped.
Memory is the session plus one sample's outputs plus fixed-size statistics, whatever the number
of samples. onnxruntime's own calibrators keep every output of every sample until the end.

When the requested tensors of one run would exceed ``group_bytes`` (estimated from shape
inference with the first sample's sizes), they are split into groups, and the data is read once
per group; a one-shot iterator can be read only once, so it gets a single group.

All methods draw on the same statistics, so :meth:`CalibrationResult.with_method` switches
method without running the model again, and the statistics can be saved and reused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.runtime._calib_data import CalibrationSource, check_feed, model_inputs
from graphopt.runtime._calib_stats import (
    METHODS,
    Scratch,
    TensorStatistics,
    compute_range,
)
from graphopt.runtime._inputs import ort_error_text

__all__ = ["CACHE_FORMAT", "CalibrationResult", "calibrate", "model_digest", "output_critical_tensors",
           "session_on_file"]

logger = logging.getLogger(__name__)

#: Version of the statistics cache file.
CACHE_FORMAT = 2

#: Default bound on the bytes of requested tensors fetched by one run.
DEFAULT_GROUP_BYTES = 256 << 20

ProgressCallback = Callable[[int, "int | None"], None]


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        target = getattr(dst, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.type == field.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


#: Bytes of external data hashed per read: the digest of a large model never holds a whole tensor.
_DIGEST_CHUNK = 1 << 20


def _external_file(tensor: onnx.TensorProto, base_dir: str | None) -> tuple[str, int, int | None]:
    """``(path, offset, length)`` of an external tensor, resolved inside ``base_dir``."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    folder = os.path.realpath(base_dir or ".")
    path = os.path.realpath(os.path.join(folder, location))
    if not location or os.path.isabs(location) or os.path.commonpath([folder, path]) != folder:
        raise GraphoptError(f"tensor '{tensor.name}' points to external data '{location}' outside the "
                            "model's folder; keep the data file next to the model")
    if not os.path.isfile(path):
        raise GraphoptError(f"external data '{location}' of tensor '{tensor.name}' is missing; keep the "
                            "data file next to the model")
    length = info.get("length")
    return path, int(info.get("offset", 0) or 0), int(length) if length else None


def _tensor_data_chunks(tensor: onnx.TensorProto, base_dir: str | None) -> Iterable[bytes]:
    """The tensor's data as its raw little-endian encoding, in chunks (read from the file if external).

    External data holds exactly what ``raw_data`` would hold, so a model digests the same
    whether its weights are inline or beside it.
    """
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        path, offset, length = _external_file(tensor, base_dir)
        with open(path, "rb") as f:
            f.seek(offset)
            left = length if length is not None else os.path.getsize(path) - offset
            while left > 0:
                chunk = f.read(min(_DIGEST_CHUNK, left))
                if not chunk:
                    raise GraphoptError(f"external data of tensor '{tensor.name}' is truncated")
                left -= len(chunk)
                yield chunk
    elif tensor.HasField("raw_data"):
        yield tensor.raw_data
    else:  # typed fields (float_data, ...): small tensors written by hand
        data = onnx.TensorProto()
        data.CopyFrom(tensor)
        data.ClearField("name")
        yield data.SerializeToString(deterministic=True)


def model_digest(model: onnx.ModelProto | str | os.PathLike, *, base_dir: str | None = None) -> str:
    """SHA-256 of the model: its structure, then each initializer's data in turn.

    Args:
        model: a ``ModelProto`` or a model file (its weights are streamed from the file, never
            loaded whole: models over 2 GB digest in constant memory).
        base_dir: where a ``ModelProto``'s external data lives (default: the current folder).

    The digest is the same whether the weights are inline or external data, so a statistics
    cache made on a model file matches the same model given as a ``ModelProto``.
    """
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        base_dir = os.path.dirname(os.path.abspath(path))
        model = _read_light(path)
    digest = hashlib.sha256()
    shell = onnx.ModelProto()
    _copy_fields(model, shell, "graph")
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, "initializer")
    for tensor in model.graph.initializer:  # the header of each tensor: name, type, shape
        graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    digest.update(shell.SerializeToString(deterministic=True))
    digest.update(graph.SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:
        for chunk in _tensor_data_chunks(tensor, base_dir):
            digest.update(chunk)
    return digest.hexdigest()


class CalibrationResult:
    """Per-tensor statistics and the ranges one calibration method draws from them.

    Attributes:
        method: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
        samples: how many samples were reduced.
        model_digest: digest of the calibrated model (a cache is refused for another model).
        stats: statistics by tensor name.
        ranges: ``(rmin, rmax)`` by tensor name for ``method`` (zero is not forced in).
        params: the method's parameters (``percentile``, ``symmetric``, ``num_quantized_bins``).
        minmax_tensors: tensors that keep their min/max range whatever the method: graph outputs
            and what a final MatMul/Gemm/Conv reads (see :func:`output_critical_tensors`); a
            clipping method would cut the extremes that decide a classifier's answer.

    Example:
        >>> result = calibrate(model, ["conv_out"], feeds, method="percentile")  # doctest: +SKIP
        >>> result.range("conv_out")  # doctest: +SKIP
        (-3.2, 7.9)
        >>> result.with_method("entropy").range("conv_out")  # doctest: +SKIP
        (-2.1, 5.6)
    """

    def __init__(self, *, method: str, samples: int, model_digest: str,
                 stats: dict[str, TensorStatistics], params: Mapping[str, Any] | None = None,
                 minmax_tensors: Iterable[str] = ()) -> None:
        if method not in METHODS:
            raise GraphoptError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
        self.method = method
        self.samples = samples
        self.model_digest = model_digest
        self.stats = stats
        self.params = dict(params or {})
        self.minmax_tensors = frozenset(minmax_tensors)
        self.ranges = {name: compute_range(s, "minmax" if name in self.minmax_tensors else method, **self.params)
                       for name, s in stats.items()}

    def range(self, tensor: str) -> tuple[float, float]:
        """``(rmin, rmax)`` of ``tensor``.

        Raises:
            GraphoptError: the tensor was not calibrated.
        """
        try:
            return self.ranges[tensor]
        except KeyError:
            raise GraphoptError(f"tensor '{tensor}' was not calibrated ({len(self.ranges)} tensors were); "
                                "calibrate it or drop its cached statistics") from None

    def with_method(self, method: str, **params: Any) -> CalibrationResult:
        """The ranges of another method (or parameters), from the stored statistics.

        Args:
            method: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
            **params: ``percentile``, ``symmetric``, ``num_quantized_bins``; unset ones keep
                their current values.
        """
        merged = {**self.params, **params}
        unknown = sorted(set(merged) - {"percentile", "symmetric", "num_quantized_bins", "mse_bits"})
        if unknown:
            raise GraphoptError(f"unknown calibration parameter '{unknown[0]}' (known: percentile, "
                                "symmetric, num_quantized_bins, mse_bits)")
        return CalibrationResult(method=method, samples=self.samples, model_digest=self.model_digest,
                                 stats=self.stats, params=merged, minmax_tensors=self.minmax_tensors)

    def merged(self, other: CalibrationResult) -> CalibrationResult:
        """This result with the tensors of ``other`` added (same model and samples), in this method.

        Lets a caller calibrate the tensors it needs first and add others later (one more pass
        over the data for those only).

        Raises:
            GraphoptError: ``other`` was made for another model or another number of samples.
        """
        if other.model_digest != self.model_digest or other.samples != self.samples:
            raise GraphoptError(f"cannot merge calibration results of different models or sample counts "
                                f"({self.samples} and {other.samples} samples); calibrate them together")
        return CalibrationResult(method=self.method, samples=self.samples, model_digest=self.model_digest,
                                 stats={**self.stats, **{k: v for k, v in other.stats.items() if k not in self.stats}},
                                 params=self.params, minmax_tensors=self.minmax_tensors | other.minmax_tensors)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an ``.npz`` cache (atomically; no pickled objects)."""
        path = os.fspath(path)
        names = list(self.stats)
        meta = {"format": CACHE_FORMAT, "method": self.method, "samples": self.samples,
                "model_digest": self.model_digest, "params": self.params, "tensors": names,
                "minmax_tensors": sorted(self.minmax_tensors)}
        bins = {s.num_bins for s in self.stats.values()}
        hist = (np.stack([self.stats[n].hist for n in names]) if names
                else np.zeros((0, bins.pop() if bins else 8), np.int64))
        headers = np.array([self.stats[n].header() for n in names], dtype=np.float64).reshape(len(names), 5)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, meta=np.array(json.dumps(meta)), headers=headers, hist=hist)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: onnx.ModelProto | str | os.PathLike | None = None
             ) -> CalibrationResult:
        """Read a cache written by :meth:`save`.

        Args:
            path: the cache file.
            model: when given, the cache must have been made for this very model.

        Raises:
            GraphoptError: a missing or unreadable file, another format, or another model.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise GraphoptError(f"calibration cache '{path}' does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                headers, hist = data["headers"], data["hist"]
        except (ValueError, OSError, KeyError) as exc:
            raise GraphoptError(f"calibration cache '{path}' is not readable ({exc}); delete it and "
                                "calibrate again") from None
        if meta.get("format") != CACHE_FORMAT:
            raise GraphoptError(f"calibration cache '{path}' has format {meta.get('format')}, this graphopt "
                                f"reads format {CACHE_FORMAT}; delete it and calibrate again")
        if model is not None:
            digest = (model_digest(model) if isinstance(model, (str, os.PathLike))
                      else model_digest(_load_model(model)))
            if digest != meta["model_digest"]:
                raise GraphoptError(f"calibration cache '{path}' was made for another model (digest "
                                    f"{meta['model_digest'][:12]}, this model {digest[:12]}); delete it "
                                    "or calibrate again")
        stats = {name: TensorStatistics.from_parts(headers[i], hist[i]) for i, name in enumerate(meta["tensors"])}
        return cls(method=meta["method"], samples=int(meta["samples"]), model_digest=meta["model_digest"],
                   stats=stats, params=meta.get("params"), minmax_tensors=meta.get("minmax_tensors", ()))

    def __repr__(self) -> str:
        return f"CalibrationResult(method={self.method!r}, samples={self.samples}, tensors={len(self.stats)})"


# -- running ------------------------------------------------------------------------------------------
def _read_light(path: str) -> onnx.ModelProto:
    """The model file at ``path`` without reading its external data (inline weights are read)."""
    if not os.path.isfile(path):
        raise GraphoptError(f"model file '{path}' does not exist")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise several types for a bad file
        raise GraphoptError(f"cannot read model '{path}': {exc}") from None


def _load_model(model: Any) -> onnx.ModelProto:
    """A ``ModelProto`` of ``model``; a path is read without its external data."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return _read_light(os.fspath(model))
    from graphopt import ir

    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    raise GraphoptError(f"cannot calibrate a {type(model).__name__}; give an onnx.ModelProto or a path")


def session_on_file(path: str | os.PathLike, outputs: Sequence[str] | None = None, *,
                    extra_outputs: Sequence[str] = (), optimize: bool = False, threads: int = 1,
                    optimized_model_path: str | None = None) -> Any:
    """An onnxruntime session on the model file ``path``, with ``outputs`` as its outputs.

    With other outputs than the graph's, the model's structure is read without its external
    data and handed over as bytes, and onnxruntime reads the external data itself from the
    model's folder; otherwise onnxruntime opens the file. Either way the weights are never
    read into Python: models over 2 GB work, and asking for intermediate tensors costs no copy
    of the weights (for a model with external data).

    Args:
        path: the model file.
        outputs: tensor names to fetch instead of the graph outputs (graph outputs among them
            keep their declared types); ``None`` keeps the graph outputs.
        extra_outputs: tensor names fetched after the outputs.
        optimize: onnxruntime graph optimizations (``ORT_ENABLE_ALL``) instead of none.
        threads: intra-op threads.
        optimized_model_path: also write onnxruntime's optimized graph there (weights as
            external data in ``optimized.data`` beside it), e.g. to count fused kernels.

    Raises:
        GraphoptError: a missing or unreadable file, or a model onnxruntime refuses.

    Example:
        >>> session = session_on_file("model.onnx", ["conv1_out"])  # doctest: +SKIP
        >>> conv1 = session.run(None, feed)[0]  # doctest: +SKIP
    """
    import onnxruntime as ort

    from graphopt.runtime._session import max_ir_version, session_options

    path = os.fspath(path)
    light = _read_light(path)
    wanted = [o.name for o in light.graph.output] if outputs is None else list(outputs)
    wanted += [name for name in extra_outputs if name not in wanted]
    as_is = (wanted == [o.name for o in light.graph.output] and light.ir_version <= max_ir_version())
    by_name = {o.name: o for o in light.graph.output}
    del light.graph.output[:]
    for name in wanted:
        light.graph.output.append(by_name[name] if name in by_name else onnx.ValueInfoProto(name=name))
    light.ir_version = min(light.ir_version, max_ir_version())
    so = session_options(optimize=optimize, threads=threads)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                os.path.dirname(os.path.abspath(path)))
    if optimized_model_path is not None:
        so.optimized_model_filepath = os.fspath(optimized_model_path)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        source: str | bytes = path if as_is else light.SerializeToString()
        del light
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for refusals
        raise GraphoptError(f"onnxruntime cannot load '{path}': {ort_error_text(exc)}") from None


def _light_copy(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """The model without its large weights (they become typed inputs), for shape inference."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    src = model.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        # Small tensors (shapes, axes) stay: shape inference reads their values.
        if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= keep_bytes:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _tensor_sizes(model: onnx.ModelProto, tensors: Sequence[str], first: Mapping[str, np.ndarray]
                  ) -> dict[str, int | None]:
    """Estimated bytes of each requested tensor for a sample like ``first`` (None: unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_light_copy(model))
    except Exception as exc:  # shape inference refuses some valid models
        logger.debug("shape inference failed (%s); tensor sizes unknown", exc)
        return {t: None for t in tensors}
    sym: dict[str, int] = {}
    for vi in inferred.graph.input:
        if vi.name in first:
            for d, size in zip(vi.type.tensor_type.shape.dim, first[vi.name].shape):
                if d.dim_param:
                    sym[d.dim_param] = int(size)
    infos = {vi.name: vi for vi in itertools.chain(inferred.graph.value_info, inferred.graph.output,
                                                   inferred.graph.input)}
    sizes: dict[str, int | None] = {}
    for name in tensors:
        vi = infos.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            sizes[name] = None
            continue
        count = 1
        for d in vi.type.tensor_type.shape.dim:
            size = d.dim_value if d.HasField("dim_value") else sym.get(d.dim_param)
            if size is None:
                count = None
                break
            count *= size
        elem = vi.type.tensor_type.elem_type
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 4
        sizes[name] = None if count is None else count * itemsize
    return sizes


def _groups(tensors: list[str], sizes: Mapping[str, int | None], budget: int) -> list[list[str]]:
    """Consecutive groups whose estimated bytes stay within ``budget`` (unknown: the largest known)."""
    known = [s for s in sizes.values() if s is not None]
    fallback = max(known) if known else 0
    groups: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        size = sizes.get(name)
        size = fallback if size is None else size
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


#: Serialized protobuf messages are limited to 2 GiB; above this many bytes of initializers the
#: calibration copy goes through a file with external data.
_INLINE_LIMIT = (2 << 30) - (64 << 20)


def _needs_external_data(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be serialized as one protobuf (its tensors near 2 GiB)."""
    return sum(t.ByteSize() for t in model.graph.initializer) > _INLINE_LIMIT


def _session_for(model: onnx.ModelProto, outputs: Sequence[str], threads: int,
                 folder: str | None = None, model_path: str | None = None) -> Any:
    """A session on ``model`` with ``outputs`` as its only outputs (the model is left as it was).

    With ``model_path`` (``model`` is that file read without its external data), onnxruntime
    reads the weights from the file's folder itself. With ``folder``, the copy is saved there
    once with external data, and each session opens the structure only: no protobuf over
    2 GiB is built.
    """
    from graphopt.runtime._session import make_session, max_ir_version

    if model_path is not None:
        return session_on_file(model_path, outputs, threads=threads)
    graph = model.graph
    saved_outputs = list(graph.output)
    saved_ir = model.ir_version
    try:
        by_name = {o.name: o for o in saved_outputs}
        del graph.output[:]
        for name in outputs:
            graph.output.append(by_name[name] if name in by_name else onnx.ValueInfoProto(name=name))
        model.ir_version = min(model.ir_version, max_ir_version())
        if folder is None:
            source: bytes | str = model.SerializeToString()
        else:
            from graphopt import ir

            source = os.path.join(folder, "calibration.onnx")
            data = os.path.join(folder, "calibration.onnx.data")
            if os.path.exists(data):  # written for an earlier group: only the structure changes
                light = onnx.load(source, load_external_data=False)
                del light.graph.output[:]
                light.graph.output.extend(graph.output)
                onnx.save(light, source)
            else:
                ir.save(ir.load(model), source, external_data=True)
    finally:
        del graph.output[:]
        graph.output.extend(saved_outputs)
        model.ir_version = saved_ir
    try:
        return make_session(source, optimize=False, threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types for refusals
        raise GraphoptError(f"onnxruntime cannot run the model for calibration: {ort_error_text(exc)}") from None


#: Ops that move values without changing them: a range read through them is the same range.
_VALUE_PRESERVING = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
#: Ops whose output is (nearly) a linear function of their data input: a final one passes the
#: clipping of its input straight into the model's output.
_FINAL_LINEAR = frozenset({"MatMul", "Gemm", "Conv"})


def output_critical_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors whose extremes decide the model's outputs: they keep min/max ranges.

    These are the graph outputs and the activation inputs of a MatMul/Gemm/Conv that writes a
    graph output (followed back through reshaping ops). Clipping methods (entropy, percentile,
    mse) cut rare large values; on a classifier's logits or the features of its last layer,
    those are the values that pick the class.

    Example:
        >>> sorted(output_critical_tensors(model))  # doctest: +SKIP
        ['features', 'flat', 'logits']
    """
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output if o}
    constants = {t.name for t in graph.initializer}
    critical = {o.name for o in graph.output}
    pending: list[str] = []
    for name in list(critical):
        node = producer.get(name)
        if node is not None and node.domain in ("", "ai.onnx") and node.op_type in _FINAL_LINEAR:
            pending.extend(i for i in node.input[:2] if i and i not in constants)
    while pending:
        name = pending.pop()
        if name in critical:
            continue
        critical.add(name)
        node = producer.get(name)
        if (node is not None and node.domain in ("", "ai.onnx") and node.op_type in _VALUE_PRESERVING
                and node.input and node.input[0] not in constants):
            pending.append(node.input[0])
    return critical


def _producible(model: onnx.ModelProto) -> set[str]:
    names = {vi.name for vi in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names


def _run_groups(proto: onnx.ModelProto, groups: list[list[str]], feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
                stats: dict[str, TensorStatistics], input_names: set[str], scratch: Scratch, threads: int,
                folder: str | None, progress: ProgressCallback | None, runs_total: int | None,
                model_path: str | None = None) -> int:
    """One pass over the data per group of tensors, reducing each sample into ``stats``; the sample count."""
    runs_done = 0
    samples = 0
    for index, group in enumerate(groups):
        # Graph inputs need no run: their statistics come from the feeds themselves.
        fetched = [t for t in group if t not in input_names]
        session = _session_for(proto, fetched, threads, folder, model_path) if fetched else None
        count = 0
        for feed in feeds():
            count += 1
            if session is not None:
                try:
                    outs = session.run(fetched, dict(feed))
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise GraphoptError(f"onnxruntime failed on calibration sample {count}: "
                                        f"{ort_error_text(exc)}") from None
                for name, value in zip(fetched, outs):
                    stats[name].update(value, scratch)
                del outs
            for name in group:
                if name in input_names:
                    stats[name].update(feed[name], scratch)
            runs_done += 1
            if progress is not None:
                progress(runs_done, runs_total)
        if count == 0:
            raise GraphoptError("the calibration data yielded no samples")
        if index == 0:
            samples = count
        elif count != samples:
            raise GraphoptError(f"the calibration data yielded {count} samples on pass {index + 1} but "
                                f"{samples} on the first; the source must give the same samples each pass")
        session = None
    return samples


def calibrate(model: onnx.ModelProto | str | os.PathLike, tensors: Sequence[str],
              data: Iterable[Mapping[str, np.ndarray]], *, method: str = "minmax",
              percentile: float = 99.999, num_bins: int = 2048, symmetric: bool = False,
              progress: ProgressCallback | None = None, threads: int = 1,
              group_bytes: int = DEFAULT_GROUP_BYTES, num_quantized_bins: int = 128,
              external_data: bool | None = None) -> CalibrationResult:
    """Collect streaming statistics of ``tensors`` over ``data`` and compute their ranges.

    Args:
        model: the float model (a ``ModelProto`` is not modified) or its path (onnxruntime then
            reads the weights from the file: they are never loaded into Python).
        tensors: names of the tensors to calibrate (graph inputs, node outputs).
        data: feeds, e.g. a :class:`CalibrationSource`, a list of dicts; any iterable works,
            a one-shot iterator with a single group.
        method: ``minmax``, ``percentile``, ``entropy`` (KL divergence) or ``mse``.
        percentile: for ``percentile``, the share of values kept (``99.999``).
        num_bins: histogram bins per tensor (a multiple of 4).
        symmetric: ranges symmetric around zero.
        progress: called as ``progress(done, total)`` after each run (``total`` None when unknown).
        threads: onnxruntime intra-op threads.
        group_bytes: bound on the bytes of requested tensors one run fetches.
        num_quantized_bins: for ``entropy``, the quantized levels compared against.
        external_data: hand a ``ModelProto`` to onnxruntime as a file with external data in a
            temporary folder (``None``: when its tensors approach the 2 GiB protobuf limit); a
            path is always opened as it is.

    Returns:
        A :class:`CalibrationResult`.

    Raises:
        GraphoptError: an unknown method or tensor, bad feeds, or a model onnxruntime cannot run.

    Example:
        >>> source = open_calibration_data("calib/", model=model)  # doctest: +SKIP
        >>> result = calibrate(model, ["x", "conv1_out"], source, method="entropy")  # doctest: +SKIP
    """
    if method not in METHODS:
        raise GraphoptError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    params = {"percentile": percentile, "symmetric": symmetric, "num_quantized_bins": num_quantized_bins}
    TensorStatistics(num_bins)  # validates num_bins before any work
    if method == "percentile" and not 0 < percentile <= 100:
        raise GraphoptError(f"percentile={percentile}: use a value in (0, 100], e.g. 99.999")
    model_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    proto = _load_model(model)
    digest = model_digest(proto, base_dir=None if model_path is None else os.path.dirname(os.path.abspath(model_path)))
    wanted = list(dict.fromkeys(tensors))
    producible = _producible(proto)
    missing = [t for t in wanted if t not in producible]
    if missing:
        raise GraphoptError(f"tensor '{missing[0]}' is not produced by any node nor an input of the model; "
                            "give names of node outputs or graph inputs")
    stats = {name: TensorStatistics(num_bins) for name in wanted}
    if not wanted:
        return CalibrationResult(method=method, samples=0, model_digest=digest, stats=stats, params=params,
                                 minmax_tensors=output_critical_tensors(proto) & set(wanted))
    inputs = model_inputs(proto)
    one_shot = getattr(data, "one_shot", False) or iter(data) is data
    checked = data if isinstance(data, CalibrationSource) else None

    def feeds() -> Iterable[Mapping[str, np.ndarray]]:
        if checked is not None:
            return checked
        return (check_feed(f, inputs, f"calibration sample {i + 1}") for i, f in enumerate(data))

    total: int | None = None
    if not one_shot:  # the length of a one-shot source is known only after reading it
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if one_shot:
        groups = [wanted]
    else:
        first = next(iter(feeds()), None)
        if first is None:
            raise GraphoptError("the calibration data yielded no samples")
        groups = _groups(wanted, _tensor_sizes(proto, wanted, first), group_bytes)
    input_names = {i.name for i in inputs}
    runs_total = None if total is None else total * len(groups)
    scratch = Scratch()  # one set of work buffers for every tensor: no allocation per update
    started = time.perf_counter()
    if model_path is not None:
        external_data = False  # onnxruntime opens the file and its external data as they are
    elif external_data is None:
        external_data = _needs_external_data(proto)
    with tempfile.TemporaryDirectory(prefix="graphopt-calib-") if external_data else nullcontext() as folder:
        samples = _run_groups(proto, groups, feeds, stats, input_names, scratch, threads, folder, progress,
                              runs_total, model_path)
    logger.info("calibrated %d tensors over %d samples in %d group(s), %.2f s", len(wanted), samples,
                len(groups), time.perf_counter() - started)
    empty = [n for n, s in stats.items() if s.count == 0]
    if empty:
        logger.warning("%d calibrated tensors held no finite values (e.g. '%s'); their range is (0, 0)",
                       len(empty), empty[0])
    return CalibrationResult(method=method, samples=samples, model_digest=digest, stats=stats, params=params,
                             minmax_tensors=output_critical_tensors(proto) & set(wanted))
