"""Simplification passes: no-op removal, chain merging, common subexpressions, constant ``If``.

* ``eliminate-no-ops`` (:class:`EliminateNoOps`): nodes whose output equals their input.
* ``merge-chains`` (:class:`MergeChains`): two conversions in a row become one (or none).
* ``eliminate-common-subexpressions`` (:class:`EliminateCommonSubexpressions`): one node per
  distinct deterministic expression and scope.
* ``inline-constant-if`` (:class:`InlineConstantIf`): an ``If`` on a constant becomes its branch.

Each runs inside ``If``/``Loop``/``Scan`` bodies and function bodies as well.
"""

from __future__ import annotations

from graphopt.passes.simplify.cse import EliminateCommonSubexpressions
from graphopt.passes.simplify.inline_if import InlineConstantIf
from graphopt.passes.simplify.merge_chains import MergeChains
from graphopt.passes.simplify.no_ops import EliminateNoOps

__all__ = ["EliminateCommonSubexpressions", "EliminateNoOps", "InlineConstantIf", "MergeChains"]
