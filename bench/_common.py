"""Helpers shared by the benchmark scripts: timing, tables, JSON output, RSS."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

__all__ = ["BENCH_DIR", "OUT_DIR", "median_time", "print_table", "write_json", "machine_info",
           "fmt_seconds", "fmt_bytes"]

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
#: Generated models are cached here (git-ignored).
OUT_DIR = os.path.join(BENCH_DIR, "out")


def median_time(fn: Callable[[], Any], repeat: int = 5,
                setup: Callable[[], Any] | None = None) -> tuple[float, float]:
    """Median wall time and median CPU time (this process) of ``repeat`` calls of ``fn``.

    ``setup`` runs untimed before each call; garbage of earlier calls is collected untimed too,
    so each call pays only for itself. CPU time is shown next to wall time because on a shared
    machine the wall time also measures the neighbours.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def fmt_seconds(s: float) -> str:
    """``0.0123`` -> ``"12.3 ms"``; seconds above 1."""
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(n: float) -> str:
    """Bytes in MB/GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: Sequence[str] = ()) -> None:
    """Print a table with rich when it is installed, else as aligned plain text."""
    cells = [[str(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells)]
        print(title)
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        for note in notes:
            print(note)
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for note in notes:
        console.print(note)


def machine_info() -> dict[str, Any]:
    """Versions and CPU count, stored with every JSON result."""
    import numpy
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine()}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus machine info) to ``path`` when one is given."""
    if not path:
        return
    payload = {"machine": machine_info(), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


_CHUNK_ELEMENTS = 4 * 1024 * 1024  # 16 MiB of float32 per write


def write_random_float32(f: Any, count: int, scale: float, seed: int) -> int:
    """Append ``count`` N(0, scale^2) float32 values to the open file ``f`` in 16 MiB chunks (a
    multi-GB weight never sits in memory); returns the bytes written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    factor = np.float32(scale)
    written = 0
    while written < count:
        n = min(_CHUNK_ELEMENTS, count - written)
        chunk = rng.standard_normal(n, dtype=np.float32)
        chunk *= factor
        chunk.tofile(f)
        written += n
    return count * 4
