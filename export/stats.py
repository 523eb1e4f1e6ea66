"""Decisions that carry their uncertainty: PASS and FAIL only with confidence, else INCONCLUSIVE.

Two kinds of claim end a release job, and both are statistical:

* **an accuracy change** between two classifiers evaluated on the same images. Only the images
  on which exactly one of them is right (the discordant pairs) say anything about the change;
  McNemar's exact test treats the number the first one alone gets right as binomial over the
  discordant images (``scipy.stats.binomtest``), and its Clopper-Pearson interval maps to an
  interval for the accuracy loss. The loss is decided against the allowed loss: below it with
  confidence is PASS, above it with confidence is FAIL, and an interval that straddles it is
  INCONCLUSIVE (too few images for the tolerance). Identical predictions PASS: the loss is 0.
  The interval is conditional on the discordant count (the exact McNemar interval): it does not
  widen for that count's own sampling noise, so when every discordant image goes one way its upper
  end is the observed loss. A loss at the tolerance therefore never passes (PASS needs the upper
  end strictly below it); an unconditional interval (Tango's score interval) would be stricter.
* **a disagreement rate** (the share of images whose top-1 class the engine changes) and **a shift in
  the predicted-class distribution** (the share of the images a class gains or loses): proportions
  with Clopper-Pearson intervals (a class's shift, like the loss, from the images moved into it
  against those moved out of it). The same three outcomes; no disagreement at all PASSES.
* **a latency ratio** measured beside an A/A control (the baseline against itself in the same
  session): a ratio within twice the control's deviation of the threshold is INCONCLUSIVE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
OUTCOMES = (PASS, FAIL, INCONCLUSIVE)


def _as_dict(decision) -> dict:
    """A decision dataclass as JSON-ready data (intervals as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(decision).items()}


def _split_interval(first: int, moved: int, images: int, confidence: float) -> tuple[float, float, float]:
    """How unevenly ``moved`` images split between two directions, as a share of all ``images``.

    ``first`` of the ``moved`` went the first way: binomial over the moved images (only they say anything), its
    exact Clopper-Pearson interval for q mapped to ``moved * (2 q - 1) / images``. Returns (low, high, two-sided
    p-value of an even split); (0, 0, 1) when nothing moved.
    """
    from scipy.stats import binomtest

    if moved == 0:
        return 0.0, 0.0, 1.0
    t = binomtest(first, moved, 0.5)
    ci = t.proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = (moved * (2.0 * q - 1.0) / images for q in (ci.low, ci.high))
    return float(lo), float(hi), float(t.pvalue)


@dataclass
class PairedAccuracy:
    """The accuracy loss of B against A on the same images, with its interval and the decision.

    ``loss_pt`` is A's top-1 minus B's (positive: B lost accuracy), in points; ``ci_pt`` its
    two-sided interval at ``confidence``, conditional on the discordant count.
    """

    images: int
    only_a_right: int
    only_b_right: int
    loss_pt: float
    ci_pt: tuple[float, float]
    confidence: float
    allowed_loss_pt: float
    p_value: float  # two-sided exact McNemar: the chance of a split this uneven when A and B are equally accurate
    outcome: str

    @property
    def discordant(self) -> int:
        return self.only_a_right + self.only_b_right

    def to_dict(self) -> dict:
        return {**_as_dict(self), "discordant": self.discordant}

    def describe(self, a: str = "the reference", b: str = "the engine") -> str:
        """One line; ``a`` and ``b`` name the two sides (``vitrim compare``: the baseline and the candidate)."""
        lo, hi = self.ci_pt
        return (f"loss {self.loss_pt:+.2f} pt, {100 * self.confidence:g}% interval [{lo:+.2f}, {hi:+.2f}] pt "
                f"(McNemar exact on {self.discordant} discordant of {self.images} images: {self.only_a_right} only "
                f"{a} gets right, {self.only_b_right} only {b}; p={self.p_value:.3g}); allowed "
                f"loss {self.allowed_loss_pt:g} pt")


def paired_accuracy(only_a_right: int, only_b_right: int, images: int, allowed_loss_pt: float,
                    confidence: float = 0.95) -> PairedAccuracy:
    """McNemar's exact test on paired predictions, as an interval for the loss and a three-way decision.

    Args:
        only_a_right: images the reference (A) classifies right and B wrong.
        only_b_right: images B classifies right and A wrong.
        images: all images both saw.
        allowed_loss_pt: the loss (points of top-1) B may have.
        confidence: two-sided confidence of the interval (0.95: each decision is one-sided at 97.5%).
    """
    if images <= 0:
        raise ValueError("paired_accuracy needs at least one image")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in [0.5, 1)")
    b, c, n = int(only_a_right), int(only_b_right), int(images)
    nd = b + c
    loss = 100.0 * (b - c) / n
    # loss = (b - c) / n = nd * (2 q - 1) / n, with q the chance a discordant image is one A alone gets right
    lo, hi, p = _split_interval(b, nd, n, confidence)
    lo, hi = 100.0 * lo, 100.0 * hi
    if nd == 0 or hi < allowed_loss_pt:  # strictly below: a loss at the tolerance never passes
        outcome = PASS
    elif lo > allowed_loss_pt:
        outcome = FAIL
    else:
        outcome = INCONCLUSIVE
    return PairedAccuracy(n, b, c, loss, (float(lo), float(hi)), confidence, float(allowed_loss_pt), p, outcome)


@dataclass
class RateTest:
    """``count`` events in ``images`` (e.g. top-1 disagreements) against a highest allowed rate."""

    count: int
    images: int
    rate: float
    interval: tuple[float, float]
    limit: float
    confidence: float
    outcome: str

    def to_dict(self) -> dict:
        return _as_dict(self)


def rate_test(count: int, images: int, limit: float, confidence: float = 0.95) -> RateTest:
    """The rate ``count / images`` against ``limit``, on its Clopper-Pearson interval at ``confidence``.

    PASS when the interval's upper end is strictly below ``limit`` (or nothing happened at all: no
    image could have shown a better engine), FAIL when its lower end is above it, INCONCLUSIVE when it
    straddles it (too few images for the limit).
    """
    from scipy.stats import binomtest

    if images <= 0:
        raise ValueError("rate_test needs at least one image")
    k, n = int(count), int(images)
    if k == 0:
        lo = hi = 0.0
    else:
        ci = binomtest(k, n, 0.5).proportion_ci(confidence_level=confidence, method="exact")
        lo, hi = float(ci.low), float(ci.high)
    outcome = PASS if k == 0 or hi < limit else FAIL if lo > limit else INCONCLUSIVE
    return RateTest(k, n, k / n, (lo, hi), float(limit), confidence, outcome)


@dataclass
class ShiftTest:
    """The share of the images one predicted class gains (positive) or loses between A and B."""

    cls: int
    moved_in: int  # images B puts in the class and A does not
    moved_out: int  # images A puts in the class and B does not
    images: int
    shift: float
    interval: tuple[float, float]
    limit: float
    confidence: float
    outcome: str

    def to_dict(self) -> dict:
        return _as_dict(self)


def shift_test(cls: int, moved_in: int, moved_out: int, images: int, limit: float,
               confidence: float = 0.95) -> ShiftTest:
    """A class's share shift ``(moved_in - moved_out) / images`` against ``+-limit``.

    As for the accuracy loss, only the images that moved say anything: the number moved in is binomial
    over all that moved, and its exact interval maps to an interval for the shift. PASS when the whole
    interval lies strictly inside ``(-limit, limit)`` (or no image moved), FAIL when it lies wholly
    outside, INCONCLUSIVE otherwise.
    """
    if images <= 0:
        raise ValueError("shift_test needs at least one image")
    a, b, n = int(moved_in), int(moved_out), int(images)
    d = a + b
    lo, hi, _ = _split_interval(a, d, n, confidence)
    if d == 0 or (-limit < lo and hi < limit):
        outcome = PASS
    elif lo > limit or hi < -limit:
        outcome = FAIL
    else:
        outcome = INCONCLUSIVE
    return ShiftTest(int(cls), a, b, n, (a - b) / n, (float(lo), float(hi)), float(limit), confidence, outcome)


def worst_shift(moved_in, moved_out, images: int, limit: float, confidence: float = 0.95) -> ShiftTest:
    """Every class's :func:`shift_test`; the decisive one: a failing class (the largest shift among them),
    else an undecided one, else the class that moved most."""
    tests = [shift_test(c, i, o, images, limit, confidence) for c, (i, o) in enumerate(zip(moved_in, moved_out))]
    if not tests:
        return shift_test(0, 0, 0, max(images, 1), limit, confidence)
    rank = {FAIL: 2, INCONCLUSIVE: 1, PASS: 0}
    return max(tests, key=lambda t: (rank[t.outcome], abs(t.shift)))


def ratio_outcome(ratio: float, threshold: float, noise: float, k: float = 2.0) -> str:
    """A latency ratio against an upper ``threshold``, given the session's noise (the A/A control's deviation).

    PASS when the ratio stays ``k`` noises below the threshold, FAIL when it is ``k`` noises above it,
    INCONCLUSIVE in between: on a machine whose A/A control moves by more than the margin, no verdict.
    """
    import math

    if not (math.isfinite(ratio) and math.isfinite(noise)):  # a broken timing is a failure, not a noisy machine
        return FAIL
    margin = k * abs(noise)
    if ratio <= threshold - margin:
        return PASS
    if ratio > threshold + margin:
        return FAIL
    return INCONCLUSIVE
