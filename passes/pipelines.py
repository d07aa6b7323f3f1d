"""Preset pipelines: ``O0``-``O3`` and the named groups they use."""

from __future__ import annotations

PIPELINES: dict[str, str] = {
    "O0": "",
}
