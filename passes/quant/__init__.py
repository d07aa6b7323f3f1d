"""Built-in quant passes."""

from __future__ import annotations

from graphopt.pipeline import Pass

PASSES: list[type[Pass]] = []

__all__ = ["PASSES"]

from graphopt.passes.quant.dynamic import QuantizeDynamic  # noqa: E402
from graphopt.passes.quant.float16 import ConvertFloat16  # noqa: E402
from graphopt.passes.quant.int4 import QuantizeInt4  # noqa: E402

PASSES += [QuantizeDynamic, QuantizeInt4, ConvertFloat16]

from graphopt.passes.quant.calibration import Calibrate  # noqa: E402
from graphopt.passes.quant.insert_qdq import InsertQdq  # noqa: E402
from graphopt.passes.quant.smoothquant import SmoothQuant  # noqa: E402

PASSES += [Calibrate, SmoothQuant, InsertQdq]
