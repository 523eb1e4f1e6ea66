"""Planted faults: a real engine's outputs damaged the way a broken engine damages them.

Every gate ships with the broken input it exists to catch (STYLE 16). :class:`Planted`
wraps a real, activated runner and corrupts what it returns, image by image, so a
fault hits the same images whatever the batch the gate streams at. The faults are
what silent engine bugs look like: a scaled or sign-flipped output, a biased class
logit, a zeroed image, swapped or collapsed classes, a constant, a NaN.

Used by the tests of :mod:`vitrim.export.parity` and by ``benchmarks/parity_calibration.py``,
which records each fault's least detectable figure beside the correct engines' worst.
"""
from __future__ import annotations

import numpy as np

from vitrim.export.runners import Runner

FAULTS = ("scale_1.2", "scale_0.8", "scale_50", "sign", "constant", "permuted", "nan", "class_bias",
          "zero_1_in_64", "swap_classes", "collapse_5pct")


class Planted(Runner):
    """A real runner whose output is damaged by ``fault`` (one of :data:`FAULTS`).

    Image-indexed faults (a zeroed image, a collapsed class) count images over every call,
    so the same images are hit at any batch size.
    """

    def __init__(self, inner: Runner, fault: str, classes: tuple[int, int] = (0, 1)):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: one of {FAULTS}")
        self.inner, self.fault, self.classes = inner, fault, classes
        self.seen = 0  # images returned so far
        self.const = None

    def sample_shape(self):
        return self.inner.sample_shape()

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = np.array(self.inner.infer(x), dtype=np.float32, copy=True)
        idx = np.arange(self.seen, self.seen + len(out))
        self.seen += len(out)
        f, (a, b) = self.fault, self.classes
        if f.startswith("scale_"):
            return out * float(f.split("_")[1])
        if f == "sign":
            return -out
        if f == "constant":  # the first images' mean logits whatever the input: the right scale, no signal
            self.const = out.mean(0) if self.const is None else self.const
            return np.broadcast_to(self.const, out.shape).copy()
        if f == "permuted":
            return np.roll(out, 1, axis=1)
        if f == "nan":  # a single NaN, in the second image
            out[idx == 1, 3] = np.nan
            return out
        if f == "class_bias":  # +1.0 on one class's logit
            out[:, a] += 1.0
            return out
        if f == "zero_1_in_64":
            out[idx % 64 == 0] = 0.0
            return out
        if f == "swap_classes":
            out[:, [a, b]] = out[:, [b, a]]
            return out
        if f == "collapse_5pct":  # every 20th image answered as class b
            hit = idx % 20 == 0
            out[hit, b] = out[hit].max(1) + 1.0
            return out
        return out
