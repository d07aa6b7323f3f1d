"""The optimizers that ``compare_peers.py`` compares, each run as one child process.

Every tool is a command line; the benchmark times the whole process (interpreter start,
imports, load, optimize, save: what a user waits for) and reads its peak RSS. Peers run
through this module as a script, with each library's default settings::

    python bench/_peers_tools.py onnxsim IN OUT
    python bench/_peers_tools.py graphopt optimize IN -o OUT -O3 -q

and reports on its last stderr line (``@@peers {json}``) the time spent inside (``load_s``,
``optimize_s``, ``save_s``) and its peak RSS (``/proc/self/status`` VmHWM). graphopt runs
through its own CLI entry point, ``graphopt.cli:main``, with the arguments given.

Tools:

- ``ort-basic``, ``ort-extended``: onnxruntime's offline optimizer
  (``SessionOptions.optimized_model_filepath``) at ORT_ENABLE_BASIC / ORT_ENABLE_EXTENDED, CPU.
  The extended output holds com.microsoft ops: it runs on onnxruntime CPU only.
- ``ort-transformers``: ``onnxruntime.transformers.optimizer.optimize_model`` (transformer
  models only; model type, heads and hidden size given).
- ``onnxsim``: ``onnxsim.simplify`` (defaults: no check runs).
- ``onnxslim``: ``onnxslim.slim``.
- ``onnxoptimizer``: ``onnxoptimizer.optimize`` (its default fuse-and-eliminate passes).
- ``onnxscript``: ``onnxscript.optimizer.optimize``.
- ``onnxscript-ort``: ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` (loaded and saved
  with ``onnx_ir``).
- ``graphopt-O2``, ``graphopt-O3``: the graphopt CLI.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["REPORT_PREFIX", "TOOLS", "Tool", "parse_report", "tool_command"]

#: Prefix of the stderr line in which a child reports its times and peak memory.
REPORT_PREFIX = "@@peers "


@dataclass(frozen=True)
class Tool:
    """One optimizer of the comparison.

    Attributes:
        name: Row label and command-line name.
        transformer_only: Run only on models that have transformer settings.
        graphopt_level: The ``-O`` level for graphopt's CLI, or None for a peer.
    """

    name: str
    transformer_only: bool = False
    graphopt_level: int | None = None


#: Every tool, in table order.
TOOLS: tuple[Tool, ...] = (
    Tool("ort-basic"), Tool("ort-extended"), Tool("ort-transformers", transformer_only=True),
    Tool("onnxsim"), Tool("onnxslim"), Tool("onnxoptimizer"), Tool("onnxscript"),
    Tool("onnxscript-ort"), Tool("graphopt-O2", graphopt_level=2), Tool("graphopt-O3", graphopt_level=3),
)


def tool_command(tool: Tool, src: str, dst: str, python: str,
                 transformer: tuple[str, int, int] | None = None) -> list[str]:
    """The command line that runs ``tool`` on ``src`` and writes ``dst``.

    graphopt runs as ``graphopt optimize SRC -o DST -O<level> -q`` (its CLI's ``main``, called
    by this module so that the peak memory of the process can be reported the same way).
    """
    if tool.graphopt_level is not None:
        return [python, os.path.abspath(__file__), "graphopt", "optimize", src, "-o", dst,
                f"-O{tool.graphopt_level}", "-q"]
    cmd = [python, os.path.abspath(__file__), tool.name, src, dst]
    if transformer is not None:
        model_type, heads, hidden = transformer
        cmd += ["--model-type", model_type, "--num-heads", str(heads), "--hidden-size", str(hidden)]
    return cmd


# ---------------------------------------------------------------------------------------------
# The child side: one peer, one model.


def _run_ort(level_name: str) -> Callable[[str, str, argparse.Namespace], dict[str, float]]:
    def run(src: str, dst: str, args: argparse.Namespace) -> dict[str, float]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
        opts.optimized_model_filepath = dst
        opts.intra_op_num_threads = 1
        t0 = time.perf_counter()
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return {"optimize_s": time.perf_counter() - t0}
    return run


def _run_proto(optimize: Callable[[Any, argparse.Namespace], Any]) -> Callable[[str, str, argparse.Namespace], dict[str, float]]:
    """Wrap a ``ModelProto -> ModelProto`` optimizer with onnx load/save."""
    def run(src: str, dst: str, args: argparse.Namespace) -> dict[str, float]:
        import onnx

        t0 = time.perf_counter()
        model = onnx.load(src)
        t1 = time.perf_counter()
        model = optimize(model, args)
        t2 = time.perf_counter()
        big = model.ByteSize() > 2_000_000_000
        onnx.save(model, dst, save_as_external_data=big, location=os.path.basename(dst) + ".data")
        return {"load_s": t1 - t0, "optimize_s": t2 - t1, "save_s": time.perf_counter() - t2}
    return run


def _onnxsim(model: Any, args: argparse.Namespace) -> Any:
    import onnxsim

    result, _ = onnxsim.simplify(model)
    return result


def _onnxslim(model: Any, args: argparse.Namespace) -> Any:
    import onnxslim

    return onnxslim.slim(model)


def _onnxoptimizer(model: Any, args: argparse.Namespace) -> Any:
    import onnxoptimizer

    return onnxoptimizer.optimize(model)


def _onnxscript(model: Any, args: argparse.Namespace) -> Any:
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def _onnxscript_ort(src: str, dst: str, args: argparse.Namespace) -> dict[str, float]:
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    t0 = time.perf_counter()
    model = onnx_ir.load(src)
    t1 = time.perf_counter()
    model, _ = optimize_for_ort(model)
    t2 = time.perf_counter()
    onnx_ir.save(model, dst)
    return {"load_s": t1 - t0, "optimize_s": t2 - t1, "save_s": time.perf_counter() - t2}


def _ort_transformers(src: str, dst: str, args: argparse.Namespace) -> dict[str, float]:
    from onnxruntime.transformers.optimizer import optimize_model

    if not args.model_type:
        raise SystemExit("ort-transformers needs --model-type")
    t0 = time.perf_counter()
    opt = optimize_model(src, model_type=args.model_type, num_heads=args.num_heads,
                         hidden_size=args.hidden_size)
    t1 = time.perf_counter()
    opt.save_model_to_file(dst)
    return {"optimize_s": t1 - t0, "save_s": time.perf_counter() - t1}


_RUNNERS: dict[str, Callable[[str, str, argparse.Namespace], dict[str, float]]] = {
    "ort-basic": _run_ort("ORT_ENABLE_BASIC"),
    "ort-extended": _run_ort("ORT_ENABLE_EXTENDED"),
    "ort-transformers": _ort_transformers,
    "onnxsim": _run_proto(_onnxsim),
    "onnxslim": _run_proto(_onnxslim),
    "onnxoptimizer": _run_proto(_onnxoptimizer),
    "onnxscript": _run_proto(_onnxscript),
    "onnxscript-ort": _onnxscript_ort,
}


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory (VmHWM), which, unlike ``ru_maxrss``, does not
    inherit the peak of the parent that forked it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_report(stderr: str) -> dict[str, Any]:
    """The report a child printed on stderr (empty when there is none)."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(REPORT_PREFIX):
            try:
                return json.loads(line[len(REPORT_PREFIX):])
            except json.JSONDecodeError:
                return {}
    return {}


def _main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {}

    def emit() -> None:
        report["peak_rss_bytes"] = _peak_rss_bytes()
        sys.stderr.write(REPORT_PREFIX + json.dumps(report) + "\n")
        sys.stderr.flush()

    atexit.register(emit)
    if argv[:1] == ["graphopt"]:
        from graphopt.cli import main

        sys.argv = ["graphopt", *argv[1:]]
        sys.exit(main())
    parser = argparse.ArgumentParser(description="Run one peer optimizer on one model.")
    parser.add_argument("tool", choices=sorted(_RUNNERS))
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--model-type", default="")
    parser.add_argument("--num-heads", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=0)
    args = parser.parse_args(argv)
    report.update(_RUNNERS[args.tool](args.src, args.dst, args))
    if not os.path.exists(args.dst):
        raise SystemExit(f"{args.tool} wrote no output")


if __name__ == "__main__":
    _main()
