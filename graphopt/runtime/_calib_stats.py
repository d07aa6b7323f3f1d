"""Streaming statistics of one tensor, and the ranges each calibration method draws from them.

Why this histogram: calibration must reduce every sample as soon as it is seen, and statistics
gathered apart (batch by batch, or by two workers) must merge into exactly what one pass over
all the data would give. The histogram here covers a symmetric range ``[-R, R]`` with a fixed,
even number of bins, where ``R`` is a power of two. When a value falls outside, ``R`` doubles
(as often as needed) and adjacent bins merge in pairs: because ``R`` only takes powers of two,
every bin edge of the finer histogram is also an edge of the coarser one, so the merged counts
are exactly those a histogram built at the final range would hold, whatever the order of the
samples. Merging two statistics is therefore exact and associative. A two-pass scheme (min/max
first, histogram second) would run the model twice; ORT's calibrators instead widen the range
by whole bins (the bin count grows with the data) or keep every output in memory. The price of
powers of two is resolution: the data spans at least half of ``[-R, R]`` on its wider side, so
at least ``num_bins / 4`` bins cover it; the default of 2048 bins leaves at least 512 there.

Min, max and count are kept exactly. Non-finite values (NaN, inf) are counted apart and left
out of every range.

From the histogram:

- ``minmax``: the exact running min and max.
- ``percentile``: cut ``(100 - p) / 2`` % of the values on each side (or ``100 - p`` % of
  ``|x|`` when symmetric), at the upper edge of the bin where the cut falls.
- ``entropy``: TensorRT's KL-divergence search on the histogram of ``|x|``: for each candidate
  threshold, the clipped distribution (outliers added to the last bin) is compared with its
  quantization to ``num_quantized_bins`` levels; the threshold of least divergence wins. The
  first bin (the exact zeros: half of a ReLU output) takes its neighbour's count, as in
  TensorRT's calibrator; left as is, that spike decides the search and clips at the smallest
  candidate.
- ``mse``: the range (the min/max range scaled by a factor in (0, 1]) that minimizes the
  expected squared error of 8-bit quantization: rounding noise ``step**2 / 12`` inside the
  range, clipping error outside it.

Every method's range is clipped to the observed ``[min, max]``; the quantizer adds zero to the
range when it needs it (zero must be exactly representable).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError

__all__ = ["METHODS", "Scratch", "TensorStatistics", "compute_range"]

#: The calibration methods, each computed from the same statistics.
METHODS = ("minmax", "percentile", "entropy", "mse")

_MIN_RANGE_EXP = -60  # 2**-60: the smallest histogram range (a tensor of zeros stays here)


def _range_exponent(absmax: float) -> int:
    """The smallest ``e`` with ``absmax <= 2**e`` (at least ``_MIN_RANGE_EXP``)."""
    if absmax <= 0 or not math.isfinite(absmax):
        return _MIN_RANGE_EXP
    mantissa, exponent = math.frexp(absmax)  # absmax = mantissa * 2**exponent, 0.5 <= mantissa < 1
    e = exponent - 1 if mantissa == 0.5 else exponent
    return max(e, _MIN_RANGE_EXP)


class Scratch:
    """Work buffers reused across :meth:`TensorStatistics.update` calls (grown as needed)."""

    __slots__ = ("_index", "_scaled")

    def __init__(self) -> None:
        self._scaled = np.empty(0, np.float64)
        self._index = np.empty(0, np.intp)

    def views(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """A float64 and an index buffer of ``size`` elements."""
        if self._scaled.size < size:
            self._scaled = np.empty(size, np.float64)
            self._index = np.empty(size, np.intp)
        return self._scaled[:size], self._index[:size]


class TensorStatistics:
    """Running min/max/count and a mergeable histogram of one tensor's values.

    Args:
        num_bins: bins of the histogram over ``[-R, R]`` (a multiple of 4).

    Example:
        >>> stats = TensorStatistics()
        >>> stats.update(np.array([-1.0, 0.5, 3.0], np.float32))
        >>> stats.min, stats.max, stats.count
        (-1.0, 3.0, 3)
    """

    __slots__ = ("count", "exponent", "hist", "max", "min", "nonfinite", "num_bins")

    def __init__(self, num_bins: int = 2048) -> None:
        if num_bins < 8 or num_bins % 4:
            raise GraphoptError(f"num_bins={num_bins}: use a multiple of 4, at least 8 (e.g. 2048)")
        self.num_bins = int(num_bins)
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0
        self.exponent = _MIN_RANGE_EXP
        self.hist = np.zeros(self.num_bins, dtype=np.int64)

    # -- building -----------------------------------------------------------------------------------
    @property
    def bound(self) -> float:
        """``R``: the histogram covers ``[-R, R]``."""
        return math.ldexp(1.0, self.exponent)

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges."""
        return np.linspace(-self.bound, self.bound, self.num_bins + 1)

    def _grow_to(self, exponent: int) -> None:
        """Double the range until it is ``2**exponent``, merging adjacent bins each time."""
        half = self.num_bins // 2
        quarter = self.num_bins // 4
        while self.exponent < exponent:
            if self.count:
                # Bin pairs (2j, 2j+1) become bin quarter + j: the old range fills the middle half.
                merged = self.hist.reshape(half, 2).sum(axis=1)
                self.hist = np.zeros(self.num_bins, dtype=np.int64)
                self.hist[quarter:quarter + half] = merged
            self.exponent += 1

    def update(self, values: np.ndarray, scratch: Scratch | None = None) -> None:
        """Add the values of one array (any shape, any real dtype).

        Args:
            values: the array.
            scratch: reusable work buffers (updating many tensors with one is ~5x faster
                than allocating fresh buffers for each array).
        """
        arr = np.asarray(values)
        if arr.dtype.kind not in "fiub":
            raise GraphoptError(f"cannot collect statistics of {arr.dtype} values; calibrate numeric tensors only")
        if arr.size == 0:
            return
        flat = arr.reshape(-1)
        if flat.dtype.kind != "f" or flat.dtype.itemsize < 4:
            flat = flat.astype(np.float32)
        lo = float(flat.min())
        hi = float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = flat[np.isfinite(flat)]
            self.nonfinite += int(flat.size - finite.size)
            flat = finite
            if flat.size == 0:
                return
            lo, hi = float(flat.min()), float(flat.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self._grow_to(_range_exponent(max(abs(lo), abs(hi))))
        self.count += int(flat.size)
        # Bin i covers [-R + i*w, -R + (i+1)*w). The scale is a power of two, so x * scale is
        # exact in float64 and a value's bin never depends on when it was added; x == R lands
        # one past the end and is folded into the last bin.
        scratch = scratch if scratch is not None else Scratch()
        scaled, index = scratch.views(flat.size)
        np.copyto(scaled, flat)
        scaled *= self.num_bins / (2.0 * self.bound)
        scaled += self.num_bins // 2
        np.copyto(index, scaled, casting="unsafe")
        counts = np.bincount(index, minlength=self.num_bins + 1)
        counts[self.num_bins - 1] += counts[self.num_bins]
        self.hist += counts[:self.num_bins]

    def merge(self, other: TensorStatistics) -> TensorStatistics:
        """A new statistics object equal to one built from the values of both (exact).

        Raises:
            GraphoptError: the two were built with different ``num_bins``.
        """
        if other.num_bins != self.num_bins:
            raise GraphoptError(f"cannot merge statistics with {self.num_bins} and {other.num_bins} "
                                "bins; calibrate both with the same num_bins")
        merged = self.copy()
        theirs = other.copy()
        top = max(merged.exponent, theirs.exponent)
        merged._grow_to(top)
        theirs._grow_to(top)
        merged.hist = merged.hist + theirs.hist
        merged.min = min(merged.min, theirs.min)
        merged.max = max(merged.max, theirs.max)
        merged.count += theirs.count
        merged.nonfinite += theirs.nonfinite
        return merged

    def copy(self) -> TensorStatistics:
        """An independent copy."""
        new = TensorStatistics(self.num_bins)
        new.min, new.max, new.count, new.nonfinite = self.min, self.max, self.count, self.nonfinite
        new.exponent = self.exponent
        new.hist = self.hist.copy()
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStatistics):
            return NotImplemented
        return (self.num_bins == other.num_bins and self.min == other.min and self.max == other.max
                and self.count == other.count and self.nonfinite == other.nonfinite
                and self.exponent == other.exponent and bool(np.array_equal(self.hist, other.hist)))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"TensorStatistics(count={self.count}, min={self.min:g}, max={self.max:g}, "
                f"bound={self.bound:g}, num_bins={self.num_bins})")

    # -- serialization --------------------------------------------------------------------------------
    def header(self) -> list[float]:
        """``[min, max, count, nonfinite, exponent]`` (the histogram is stored apart)."""
        return [self.min, self.max, float(self.count), float(self.nonfinite), float(self.exponent)]

    @classmethod
    def from_parts(cls, header: Any, hist: np.ndarray) -> TensorStatistics:
        """Rebuild from :meth:`header` and the histogram."""
        stats = cls(int(hist.shape[0]))
        stats.min, stats.max = float(header[0]), float(header[1])
        stats.count, stats.nonfinite, stats.exponent = int(header[2]), int(header[3]), int(header[4])
        stats.hist = np.asarray(hist, dtype=np.int64).copy()
        return stats


# -- ranges -------------------------------------------------------------------------------------------
def compute_range(stats: TensorStatistics, method: str, *, percentile: float = 99.999,
                  symmetric: bool = False, num_quantized_bins: int = 128,
                  mse_bits: int = 8) -> tuple[float, float]:
    """The ``(rmin, rmax)`` that ``method`` chooses from ``stats``.

    Raises:
        GraphoptError: an unknown method or a percentile outside (0, 100].
    """
    if method not in METHODS:
        raise GraphoptError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    if stats.count == 0:
        return (0.0, 0.0)
    lo, hi = stats.min, stats.max
    if method == "minmax":
        rmin, rmax = lo, hi
    elif method == "percentile":
        if not 0 < percentile <= 100:
            raise GraphoptError(f"percentile={percentile}: use a value in (0, 100], e.g. 99.999")
        rmin, rmax = _percentile_range(stats, percentile, symmetric)
    elif method == "entropy":
        threshold = _entropy_threshold(stats, num_quantized_bins)
        rmin, rmax = -threshold, threshold
    else:
        rmin, rmax = _mse_range(stats, mse_bits, symmetric)
    if symmetric:
        amax = max(abs(rmin), abs(rmax))
        return (-amax, amax)
    return (max(rmin, lo), min(rmax, hi))


def _abs_histogram(stats: TensorStatistics) -> np.ndarray:
    """Counts of ``|x|`` over ``num_bins / 2`` bins of ``[0, R]`` (folding the signed histogram)."""
    half = stats.num_bins // 2
    return stats.hist[half:] + stats.hist[:half][::-1]


def _percentile_range(stats: TensorStatistics, percentile: float, symmetric: bool) -> tuple[float, float]:
    edges = stats.edges
    if symmetric:
        counts = _abs_histogram(stats)
        cdf = np.cumsum(counts) / stats.count
        idx = min(int(np.searchsorted(cdf, percentile / 100.0)), counts.size - 1)
        threshold = float(edges[stats.num_bins // 2 + idx + 1])
        return (-threshold, threshold)
    cdf = np.cumsum(stats.hist) / stats.count
    cut = (100.0 - percentile) / 200.0
    right = min(int(np.searchsorted(cdf, 1.0 - cut)), stats.num_bins - 1)
    left = min(int(np.searchsorted(cdf, cut, side="right")), stats.num_bins - 1)
    return (float(edges[left]), float(edges[right + 1]))


def _smoothed(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move a little mass to the empty bins of a histogram so KL(p || q) stays finite."""
    zeros = p == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = p.size - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    if eps1 >= 1.0:
        return None
    return p + eps * zeros - eps1 * ~zeros


def _entropy_threshold(stats: TensorStatistics, num_quantized_bins: int) -> float:
    """TensorRT's KL-divergence threshold on the histogram of ``|x|``."""
    counts = _abs_histogram(stats).astype(np.float64)
    # The first bin holds the exact zeros (half of a ReLU output): zero is exactly representable,
    # so they carry no quantization error, yet spreading that spike over its quantized group
    # dominates the divergence and drives the threshold to the smallest candidate. TensorRT's
    # calibrator gives the first bin its neighbour's count instead.
    if counts.size > 1:
        counts[0] = counts[1]
    width = stats.bound / counts.size
    last = int(np.max(np.nonzero(counts)[0])) + 1 if counts.any() else 0
    if last <= num_quantized_bins:
        return last * width
    # Candidates from num_quantized_bins to the last non-empty bin; at most ~192 evaluated,
    # which keeps the search at a few milliseconds per tensor.
    stride = max(1, -(-(last - num_quantized_bins) // 192))
    candidates = list(range(num_quantized_bins, last + 1, stride))
    if candidates[-1] != last:
        candidates.append(last)
    best_i, best_kl = last, math.inf
    total_tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # total_tail[i] = sum(counts[i:])
    for i in candidates:
        reference = counts[:i].copy()
        reference[i - 1] += total_tail[i]
        sliced = counts[:i]
        nonzero = sliced != 0
        # Split the i bins into num_quantized_bins groups as evenly as possible.
        group = (np.arange(i) * num_quantized_bins) // i
        sums = np.bincount(group, weights=sliced, minlength=num_quantized_bins)
        used = np.bincount(group, weights=nonzero.astype(np.float64), minlength=num_quantized_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_bin = np.where(used > 0, sums / np.maximum(used, 1), 0.0)
        expanded = np.where(nonzero, per_bin[group], 0.0)
        # Smooth the counts (not the probabilities), as TensorRT does, then normalize.
        p = _smoothed(reference)
        q = _smoothed(expanded)
        if p is None or q is None:
            continue
        p = p / p.sum()
        q = q / q.sum()
        kl = float(np.sum(p * np.log(p / q)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


def _mse_range(stats: TensorStatistics, bits: int, symmetric: bool) -> tuple[float, float]:
    """The scaled min/max range of least expected squared quantization error."""
    edges = stats.edges
    centers = (edges[:-1] + edges[1:]) * 0.5
    used = stats.hist > 0
    centers, counts = centers[used], stats.hist[used].astype(np.float64)
    lo, hi = stats.min, stats.max
    if symmetric:
        amax = max(abs(lo), abs(hi))
        lo, hi = -amax, amax
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2 ** bits - 1
    scales = np.linspace(0.02, 1.0, 256)[:, None]  # candidate factors (rows) x bins (columns)
    cand_lo, cand_hi = lo * scales, hi * scales
    step = (cand_hi - cand_lo) / levels
    clipped = np.clip(centers[None, :], cand_lo, cand_hi)
    error = np.where(centers[None, :] == clipped, step ** 2 / 12.0, (centers[None, :] - clipped) ** 2)
    best = int(np.argmin(error @ counts))
    return (float(cand_lo[best, 0]), float(cand_hi[best, 0]))
