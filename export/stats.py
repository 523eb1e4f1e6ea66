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
* **a latency ratio** measured beside an A/A control (the baseline against itself in the same
  session): a ratio within twice the control's deviation of the threshold is INCONCLUSIVE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
OUTCOMES = (PASS, FAIL, INCONCLUSIVE)


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
        d = asdict(self)
        d["ci_pt"] = list(self.ci_pt)
        d["discordant"] = self.discordant
        return d

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
    from scipy.stats import binomtest

    if images <= 0:
        raise ValueError("paired_accuracy needs at least one image")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in [0.5, 1)")
    b, c, n = int(only_a_right), int(only_b_right), int(images)
    nd = b + c
    loss = 100.0 * (b - c) / n
    if nd == 0:  # identical decisions: the loss is exactly zero, no interval to speak of
        lo = hi = 0.0
        p = 1.0
    else:
        t = binomtest(b, nd, 0.5)
        ci = t.proportion_ci(confidence_level=confidence, method="exact")
        # loss = (b - c) / n = nd * (2 q - 1) / n, with q the chance a discordant image is one A alone gets right
        lo, hi = (100.0 * nd * (2.0 * q - 1.0) / n for q in (ci.low, ci.high))
        p = float(t.pvalue)
    if nd == 0 or hi < allowed_loss_pt:  # strictly below: a loss at the tolerance never passes
        outcome = PASS
    elif lo > allowed_loss_pt:
        outcome = FAIL
    else:
        outcome = INCONCLUSIVE
    return PairedAccuracy(n, b, c, loss, (float(lo), float(hi)), confidence, float(allowed_loss_pt), p, outcome)


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
