"""Built-in quant passes: static QDQ (calibrate, smooth-quant, insert-qdq), dynamic int8, int4, float16."""

from __future__ import annotations

from graphopt.passes.quant.calibration import Calibrate
from graphopt.passes.quant.dynamic import QuantizeDynamic
from graphopt.passes.quant.float16 import ConvertFloat16
from graphopt.passes.quant.insert_qdq import InsertQdq
from graphopt.passes.quant.int4 import QuantizeInt4
from graphopt.passes.quant.smoothquant import SmoothQuant

from graphopt.pipeline import Pass

PASSES: list[type[Pass]] = [QuantizeDynamic, QuantizeInt4, ConvertFloat16, Calibrate, SmoothQuant, InsertQdq]

__all__ = ["PASSES"]
