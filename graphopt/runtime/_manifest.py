"""The manifest of a partitioned model: which partition files run where, and what flows between them.

``graphopt partition`` writes one ONNX model per partition plus ``manifest.json`` in an output
folder; :class:`graphopt.runtime.PartitionedSession` and ``graphopt run`` read it back. The file is
plain JSON (format ``graphopt.partition/1``) so that other tools can schedule the partitions too.

Example:
    >>> manifest = Manifest.load("model.parts")            # doctest: +SKIP
    >>> [p.name for p in manifest.topological_order()]      # doctest: +SKIP
    ['stage0', 'stage1']
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "Manifest", "PartitionSpec", "TensorSpec", "TransferSpec"]

MANIFEST_FORMAT = "graphopt.partition/1"
MANIFEST_NAME = "manifest.json"
#: Partition kinds: a pipeline stage, an independent branch, a tensor-parallel shard, or a
#: partition that combines shard results (Concat/Sum).
PARTITION_KINDS = ("stage", "branch", "shard", "combine")


@dataclass
class TensorSpec:
    """A tensor crossing the model boundary: name, numpy dtype name, and dims (int, str or None)."""

    name: str
    dtype: str
    shape: list[int | str | None] | None = None


@dataclass
class PartitionSpec:
    """One partition: its model file (relative to the manifest folder) and how to run it.

    Attributes:
        id: position in the manifest; partitions are listed in a topological order.
        name: readable name (``stage0``, ``shard1``...).
        file: ONNX file, relative to the manifest's folder (its external data lies beside it).
        kind: one of ``stage``, ``branch``, ``shard``, ``combine``.
        inputs: tensor names the partition reads (graph inputs or other partitions' outputs).
        outputs: tensor names it produces.
        device: ``cpu`` or ``cuda:K``.
        resources: scheduler requests, e.g. ``{"num_cpus": 1, "num_gpus": 0}`` (Ray resources).
        weight_bytes: bytes of initializers stored in the partition.
        peak_activation_bytes: estimated peak bytes of live intermediates.
        flops: estimated floating-point operations of one run.
        depends_on: ids of partitions whose outputs it reads.
    """

    id: int
    name: str
    file: str
    kind: str = "stage"
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    device: str = "cpu"
    resources: dict[str, float] = field(default_factory=dict)
    weight_bytes: int = 0
    peak_activation_bytes: int = 0
    flops: float = 0.0
    depends_on: list[int] = field(default_factory=list)


@dataclass
class TransferSpec:
    """A tensor sent from one partition (``source``; -1 for a graph input) to others."""

    tensor: str
    source: int
    targets: list[int]
    bytes: int = 0


@dataclass
class Manifest:
    """Everything needed to run a partitioned model; see the module docstring.

    Attributes:
        partitions: in a topological order (every input of a partition is a graph input or an
            output of an earlier partition).
        inputs / outputs: the original model's graph inputs and outputs.
        transfers: tensors that cross partitions, with estimated bytes per run.
        strategy: how the plan was made (``stages``, ``memory-budget``, ``devices``,
            ``branches``, ``tensor-parallel``).
        source_model: file name of the model that was partitioned.
        meta: free-form plan details (cost model settings, predicted throughput...).
        assemble: model outputs that no partition produces whole but the caller assembles
            from partition outputs after the run, each
            ``{"output": name, "op": "concat", "axis": int, "parts": [tensor names]}``
            (a heavy node split into column blocks whose Concat was a graph output: the slices
            go straight to the caller instead of crossing partitions). Empty in older manifests.
    """

    partitions: list[PartitionSpec]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    transfers: list[TransferSpec] = field(default_factory=list)
    strategy: str = "stages"
    source_model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    assemble: list[dict[str, Any]] = field(default_factory=list)
    #: Folder the manifest was loaded from (not serialized).
    base_dir: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to ``manifest.json``."""
        data = asdict(self)
        data.pop("base_dir")
        return data

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``manifest.json`` into ``folder`` atomically and return its path."""
        self.validate(check_files=False)
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        """Read and validate ``manifest.json`` from ``folder`` (or the manifest file itself)."""
        path = Path(folder)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise GraphoptError(f"no partition manifest at '{path}'; pass the folder written by "
                                "`graphopt partition`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GraphoptError(f"cannot read partition manifest '{path}': {exc}") from None
        manifest = cls.from_dict(data, source=str(path))
        manifest.base_dir = str(path.parent)
        manifest.validate(check_files=True)
        return manifest

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest") -> Manifest:
        """Build a manifest from its JSON form, with a clear error for a malformed file."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise GraphoptError(f"{source} is not a graphopt partition manifest (format "
                                f"'{found}', expected '{MANIFEST_FORMAT}')")
        try:
            return cls(
                partitions=[PartitionSpec(**p) for p in data["partitions"]],
                inputs=[TensorSpec(**t) for t in data["inputs"]],
                outputs=[TensorSpec(**t) for t in data["outputs"]],
                transfers=[TransferSpec(**t) for t in data.get("transfers", [])],
                strategy=data.get("strategy", "stages"),
                source_model=data.get("source_model", ""),
                meta=dict(data.get("meta", {})),
                assemble=[dict(entry) for entry in data.get("assemble", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GraphoptError(f"{source} is malformed: {exc}") from None

    def partition_path(self, partition: PartitionSpec) -> Path:
        """Absolute path of a partition's model file, refused if it leaves the manifest folder."""
        base = Path(self.base_dir or ".").resolve()
        path = (base / partition.file).resolve()
        if base != path and base not in path.parents:
            raise GraphoptError(f"partition '{partition.name}' points outside the manifest folder "
                                f"('{partition.file}'); partition files must lie inside it")
        return path

    def assembled(self) -> dict[str, dict[str, Any]]:
        """The ``assemble`` entries by the model output they make."""
        return {entry["output"]: entry for entry in self.assemble}

    def topological_order(self) -> list[PartitionSpec]:
        """The partitions in the order they can run one after another."""
        return list(self.partitions)

    def validate(self, *, check_files: bool = True) -> None:
        """Check ids, kinds, that every input is available before use, and that outputs are made.

        Raises:
            GraphoptError: naming the first inconsistency found.
        """
        available = {t.name for t in self.inputs}
        produced_by: dict[str, int] = {}
        for position, part in enumerate(self.partitions):
            if part.id != position:
                raise GraphoptError(f"manifest partition '{part.name}' has id {part.id} at position "
                                    f"{position}; ids must be 0..N-1 in order")
            if part.kind not in PARTITION_KINDS:
                raise GraphoptError(f"manifest partition '{part.name}' has unknown kind '{part.kind}' "
                                    f"(expected one of {', '.join(PARTITION_KINDS)})")
            missing = [name for name in part.inputs if name not in available]
            if missing:
                raise GraphoptError(f"manifest partition '{part.name}' reads {missing} before any "
                                    "partition produces them (partitions must be in topological order)")
            for dep in part.depends_on:
                if not 0 <= dep < position:
                    raise GraphoptError(f"manifest partition '{part.name}' depends on partition {dep}, "
                                        "which does not come before it")
            for name in part.outputs:
                if name in produced_by:
                    raise GraphoptError(f"tensor '{name}' is produced by two partitions "
                                        f"({produced_by[name]} and {part.id})")
                produced_by[name] = part.id
                available.add(name)
            if check_files and not self.partition_path(part).is_file():
                raise GraphoptError(f"partition file '{part.file}' of '{part.name}' is missing from "
                                    f"'{self.base_dir}'")
        output_names = {t.name for t in self.outputs}
        assembled: set[str] = set()
        for entry in self.assemble:
            name = entry.get("output") if isinstance(entry, dict) else None
            parts = entry.get("parts") if isinstance(entry, dict) else None
            if (name not in output_names or entry.get("op") != "concat"
                    or not isinstance(entry.get("axis"), int) or isinstance(entry.get("axis"), bool)
                    or not isinstance(parts, list) or not parts
                    or not all(isinstance(part, str) for part in parts)):
                raise GraphoptError(f"manifest assemble entry {entry!r} is malformed; expected "
                                    '{"output": <a model output>, "op": "concat", "axis": <int>, '
                                    '"parts": [<tensor names>]}')
            if name in assembled:
                raise GraphoptError(f"model output '{name}' is assembled twice in the manifest")
            unmade = [part for part in parts if part not in produced_by]
            if unmade:
                raise GraphoptError(f"manifest assembles model output '{name}' from {unmade}, which no "
                                    "partition produces")
            assembled.add(name)
        missing_outputs = [t.name for t in self.outputs if t.name not in available and t.name not in assembled]
        if missing_outputs:
            raise GraphoptError(f"manifest produces no partition output for model outputs {missing_outputs}")
