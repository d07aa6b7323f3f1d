"""Running user-given models in the tools: sessions, ``--dim`` sizes, ``.npz`` files, generated feeds.

Sessions are opened with errors a user can act on: a missing file, a model onnxruntime refuses,
or a CUDA provider that is not there all become one-line :class:`GraphoptError` messages.

Generated feeds follow the session's declared inputs: element types are respected, static dims
are kept, symbolic dims take the size given for their name (default 1), integers are drawn
from a small non-negative range so they are safe as indices, and the same seed always gives
the same arrays. Feeds read from a file are checked against the same declarations, so a wrong
name, element type or size is reported before anything runs.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime._session import PROVIDERS, make_session, random_inputs

__all__ = [
    "DEFAULT_DIM",
    "ORT_LEVELS",
    "check_feeds",
    "check_provider",
    "generate_feeds",
    "load_feeds",
    "open_session",
    "ort_error_text",
    "parse_dims",
    "symbolic_dims",
]

logger = logging.getLogger(__name__)

#: Size given to a symbolic dim that no ``--dim`` names.
DEFAULT_DIM = 1

#: onnxruntime graph optimization levels the tools offer: everything, or nothing.
ORT_LEVELS = ("all", "disable")

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


_LOAD_PREFIX = re.compile(r"^Load model from .*? failed:\s*")
_SOURCE_LOCATION = re.compile(r"\S+\.(?:cc|cpp|h):\d+ ")


def ort_error_text(exc: BaseException) -> str:
    """The first line of an onnxruntime error, without its ``[ONNXRuntimeError] : N : CODE :``
    prefix, nor the C++ source location and function signature many messages carry.

    Example:
        >>> ort_error_text(RuntimeError("[ONNXRuntimeError] : 1 : FAIL : model.cc:256 "
        ...                             "onnxruntime::Model::Model(const Proto&) Unsupported IR"))
        'Unsupported IR'
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _LOAD_PREFIX.sub("", _ORT_PREFIX.sub("", text))
    located = _SOURCE_LOCATION.search(text)
    if located:
        # The signature ends at the first space outside parentheses once they have opened.
        rest = text[located.end():]
        depth, opened = 0, False
        for i, ch in enumerate(rest):
            if ch == "(":
                depth, opened = depth + 1, True
            elif ch == ")":
                depth -= 1
            elif ch == " " and depth == 0 and opened:
                return (text[:located.start()] + rest[i + 1:]).strip()
    return text


def check_provider(provider: str) -> None:
    """Refuse an unknown provider, or ``cuda`` when this onnxruntime has no CUDA provider.

    Raises:
        GraphoptError: with the providers that are available.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise GraphoptError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise GraphoptError(
            f"the {provider.upper()} execution provider is not available in this onnxruntime "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install "
            f"\"graphopt[gpu]\") on a machine with an NVIDIA GPU, or use --provider cpu")


def open_session(source: str | os.PathLike | bytes | Any, *, provider: str = "cpu",
                 level: str = "disable", threads: int = 1, label: str | None = None) -> Any:
    """An onnxruntime session for a user-given model, with errors a user can act on.

    Args:
        source: a model path (external data is found next to it), serialized bytes or a ``ModelProto``.
        provider: ``"cpu"`` or ``"cuda"``.
        level: ``"disable"`` (onnxruntime graph optimizations off) or ``"all"``.
        threads: intra-op threads.
        label: how messages name the model (default: the path).

    Raises:
        GraphoptError: missing file, a model onnxruntime refuses, an unavailable provider.

    Example:
        >>> sess = open_session("model.onnx", level="all")  # doctest: +SKIP
    """
    if level not in ORT_LEVELS:
        raise GraphoptError(f"unknown onnxruntime level '{level}'; choose one of {', '.join(ORT_LEVELS)}")
    check_provider(provider)
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        label = label or f"'{source}'"
        if not os.path.exists(source):
            raise GraphoptError(f"model file '{source}' does not exist")
        if os.path.isdir(source):
            raise GraphoptError(f"'{source}' is a folder, not an ONNX model file")
    label = label or "the model"
    try:
        session = make_session(source, target=provider, optimize=level == "all", threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types for refusals
        raise GraphoptError(f"onnxruntime cannot load {label}: {ort_error_text(exc)}") from None
    if session.get_providers()[0] != PROVIDERS[provider]:
        raise GraphoptError(f"the {provider.upper()} execution provider failed to start for {label} "
                            f"(onnxruntime fell back to {session.get_providers()[0]}); check the "
                            "CUDA and cuDNN libraries onnxruntime-gpu needs")
    return session


def parse_dims(specs: Iterable[str]) -> dict[str, int]:
    """Parse ``NAME=SIZE`` strings (the ``--dim`` option) into a dict.

    Raises:
        GraphoptError: a spec without ``=``, an empty name, or a size that is not a positive integer.

    Example:
        >>> parse_dims(["batch=4", "seq=128"])
        {'batch': 4, 'seq': 128}
    """
    dims: dict[str, int] = {}
    for spec in specs:
        name, sep, size = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise GraphoptError(f"--dim '{spec}' is not NAME=SIZE (for example --dim batch=8)")
        try:
            value = int(size)
        except ValueError:
            raise GraphoptError(f"--dim '{spec}': size '{size}' is not an integer") from None
        if value < 1:
            raise GraphoptError(f"--dim '{spec}': size must be at least 1")
        dims[name] = value
    return dims


def symbolic_dims(session: Any) -> set[str]:
    """Names of the symbolic dims among the session's inputs."""
    return {d for inp in session.get_inputs() for d in inp.shape if isinstance(d, str)}


def _check_dim_names(sessions: Iterable[Any], dims: Mapping[str, int]) -> None:
    known: set[str] = set()
    for sess in sessions:
        known |= symbolic_dims(sess)
    unknown = sorted(set(dims) - known)
    if unknown:
        listed = ", ".join(sorted(known)) or "none: every input dim is fixed"
        raise GraphoptError(f"--dim {unknown[0]}: the model has no symbolic input dim of that name "
                            f"(its symbolic dims: {listed})")


def generate_feeds(session: Any, *, seed: int = 0, dims: Mapping[str, int] | None = None,
                   default_dim: int = DEFAULT_DIM, check_dims: bool = True) -> dict[str, np.ndarray]:
    """Seeded inputs for every input of an onnxruntime session.

    Args:
        session: an ``onnxruntime.InferenceSession``.
        seed: the same seed gives the same arrays.
        dims: sizes of symbolic dims by name; others get ``default_dim``.
        default_dim: size of symbolic or unknown dims not named in ``dims``.
        check_dims: refuse names in ``dims`` that are no symbolic dim of the session's inputs.

    Raises:
        GraphoptError: an input of a type that cannot be generated (pass it in a file), or a
            ``dims`` name the model does not have.

    Example:
        >>> feeds = generate_feeds(session, dims={"batch": 2})  # doctest: +SKIP
    """
    dims = dict(dims or {})
    if check_dims:
        _check_dim_names([session], dims)
    try:
        return random_inputs(session, seed=seed, dims=dims, default_dim=default_dim)
    except ValueError as exc:
        raise GraphoptError(f"{exc}; give the inputs in an .npz file (--inputs)") from None


def load_feeds(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read inputs from an ``.npz`` file whose keys are input names.

    Raises:
        GraphoptError: the file is missing, not an ``.npz`` archive, empty, or holds pickled objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphoptError(f"inputs file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise GraphoptError(f"inputs file '{path}' is a single .npy array; save the inputs "
                                    "with numpy.savez(path, input_name=array, ...)")
            feeds = {name: data[name] for name in data.files}
    except GraphoptError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise GraphoptError(f"inputs file '{path}' is not a readable .npz archive ({exc}); save the "
                            "inputs with numpy.savez(path, input_name=array, ...)") from None
    if not feeds:
        raise GraphoptError(f"inputs file '{path}' holds no arrays")
    return feeds


def check_feeds(session: Any, feeds: Mapping[str, Any], *, source: str = "the given inputs"
                ) -> dict[str, np.ndarray]:
    """Check feeds against the session's inputs: names, element types, ranks and static dims.

    Returns the feeds the session reads, as numpy arrays.

    Raises:
        GraphoptError: an input is missing, a name is not an input, or an array has the wrong
            element type, rank or size of a fixed dim.
    """
    from graphopt.runtime._session import _ORT_TYPES

    declared: dict[str, tuple[np.dtype | None, Sequence[Any] | None, str]] = {}
    for inp in session.get_inputs():
        want = _ORT_TYPES.get(inp.type)
        dtype = None if want is None or want is np.str_ else np.dtype(want)
        declared[inp.name] = (dtype, inp.shape, inp.type)
    return check_feed_arrays(declared, feeds, prefix=f"{source}: ", model="the model")


def check_feed_arrays(declared: Mapping[str, tuple[np.dtype | None, Sequence[Any] | None, str]],
                      feeds: Mapping[str, Any], *, prefix: str = "", model: str = "the model"
                      ) -> dict[str, np.ndarray]:
    """Check feeds against declared inputs ``{name: (numpy dtype or None, dims or None, type text)}``.

    A ``None`` dtype or dims is not checked (a type numpy cannot name, an unknown shape). Dims
    that are non-negative ints must match exactly; other dims (symbolic, unknown) take any size.
    ``prefix`` starts every message (e.g. the file the feeds came from); ``model`` names the
    model in messages.

    Returns:
        The feeds, as numpy arrays, in the declared order.

    Raises:
        GraphoptError: naming the first input that is missing, unknown or of the wrong type,
            rank or fixed size.
    """
    extra = sorted(set(feeds) - set(declared))
    if extra:
        raise GraphoptError(f"{prefix}'{extra[0]}' is not an input of {model} "
                            f"(inputs: {', '.join(declared)})")
    missing = [name for name in declared if name not in feeds]
    if missing:
        raise GraphoptError(f"{prefix}input '{missing[0]}' is missing ({model} needs: "
                            f"{', '.join(declared)})")
    checked: dict[str, np.ndarray] = {}
    for name, (dtype, shape, type_text) in declared.items():
        arr = np.asarray(feeds[name])
        if dtype is not None and arr.dtype != dtype:
            raise GraphoptError(f"{prefix}input '{name}' is {arr.dtype} but the model expects "
                                f"{type_text}; convert it (array.astype(...))")
        if shape is not None:
            if len(shape) != arr.ndim:
                raise GraphoptError(f"{prefix}input '{name}' has shape {list(arr.shape)} but the model "
                                    f"expects rank {len(shape)} ({_shape_text(shape)})")
            for axis, (dim, size) in enumerate(zip(shape, arr.shape)):
                if isinstance(dim, int) and dim >= 0 and dim != size:
                    raise GraphoptError(f"{prefix}input '{name}' has size {size} on axis {axis}, "
                                        f"the model fixes it to {dim} ({_shape_text(shape)})")
        checked[name] = arr
    return checked


def _shape_text(shape: Iterable[Any]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
