"""An example graphopt plugin: one rewrite pass, ``fold-double-negation``.

graphopt loads this module through the ``graphopt.passes`` entry point declared in
``pyproject.toml`` and registers every class in ``PASSES``.

Example:
    >>> from graphopt.pipeline import PassRegistry
    >>> PassRegistry.default().get("fold-double-negation").__name__  # doctest: +SKIP
    'FoldDoubleNegation'
"""

from __future__ import annotations

from graphopt_example_plugin.double_negation import FoldDoubleNegation

PASSES = [FoldDoubleNegation]

__all__ = ["PASSES", "FoldDoubleNegation"]
