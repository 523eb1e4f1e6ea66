"""The decisions under uncertainty: McNemar's exact interval for an accuracy loss, and the latency outcome."""
import numpy as np
import pytest
from scipy.stats import binomtest

from vitrim.export.stats import FAIL, INCONCLUSIVE, PASS, paired_accuracy, ratio_outcome


def test_identical_predictions_pass_with_a_zero_interval():
    a = paired_accuracy(0, 0, 500, 0.3)
    assert a.outcome == PASS and a.ci_pt == (0.0, 0.0) and a.loss_pt == 0.0 and a.p_value == 1.0


def test_the_interval_is_clopper_pearson_on_the_discordant_images():
    a = paired_accuracy(60, 40, 10_000, 0.3, confidence=0.95)
    ci = binomtest(60, 100).proportion_ci(0.95, method="exact")
    assert a.ci_pt == pytest.approx((100 * 100 * (2 * ci.low - 1) / 10_000, 100 * 100 * (2 * ci.high - 1) / 10_000))
    assert a.loss_pt == pytest.approx(0.2) and a.ci_pt[0] < a.loss_pt < a.ci_pt[1]
    assert a.to_dict()["discordant"] == 100


@pytest.mark.parametrize("b,c,n,want", [
    (3, 0, 512, INCONCLUSIVE),      # 3 net flips on 512 images: the old +-0.5 pt gate failed this
    (90, 90, 10_000, PASS),         # equal accuracy, many images: the loss is below 0.3 pt with confidence
    (118, 119, 10_000, INCONCLUSIVE),  # the demo's 2.4% discordant: 10,000 images just fail to show 0.3 pt
    (200, 50, 10_000, FAIL),        # 1.5 pt lost, surely more than 0.3
    (20, 20, 512, INCONCLUSIVE),    # equal accuracy, too few images for a 0.3 pt tolerance
])
def test_three_outcomes(b, c, n, want):
    assert paired_accuracy(b, c, n, 0.3).outcome == want


@pytest.mark.parametrize("n,discordant_rate", [(512, 0.06), (10_000, 0.024)])
def test_an_equally_accurate_candidate_almost_never_fails(n, discordant_rate):
    """The old `delta < -0.3 pt` rule failed such a candidate with probability 0.30-0.43 on 512 images and 0.026
    on 10,000. The interval fails it only when the loss is above 0.3 pt with confidence: far under 2.5%."""
    rng = np.random.default_rng(0)
    fails = 0
    for _ in range(2000):
        nd = rng.binomial(n, discordant_rate)
        b = rng.binomial(nd, 0.5)
        fails += paired_accuracy(b, nd - b, n, 0.3).outcome == FAIL
    assert fails / 2000 < 0.01


def test_a_real_loss_is_caught_once_the_images_suffice():
    rng = np.random.default_rng(1)
    outs = []
    for _ in range(200):  # a true loss of 1 pt: 3% discordant, 2/3 of them the baseline's
        nd = rng.binomial(10_000, 0.03)
        b = rng.binomial(nd, 2 / 3)
        outs.append(paired_accuracy(b, nd - b, 10_000, 0.3).outcome)
    assert outs.count(FAIL) / len(outs) > 0.9 and PASS not in outs


def test_latency_outcome_needs_the_ratio_clear_of_the_threshold_by_twice_the_noise():
    assert ratio_outcome(1.00, 1.03, 0.005) == PASS
    assert ratio_outcome(1.20, 1.03, 0.01) == FAIL
    assert ratio_outcome(1.00, 1.03, 0.05) == INCONCLUSIVE  # the A/A control moved more than the threshold
    assert ratio_outcome(1.035, 1.03, 0.005) == INCONCLUSIVE


def test_a_loss_at_the_tolerance_never_passes_and_a_broken_timing_fails():
    """Review finding: with every discordant image one way, the conditional interval's upper end is the
    observed loss; 30 of 10,000 is exactly 0.3 pt, which must not PASS a 0.3 pt tolerance."""
    assert paired_accuracy(30, 0, 10_000, 0.3).outcome == INCONCLUSIVE
    assert ratio_outcome(float("nan"), 1.03, 0.01) == FAIL and ratio_outcome(1.0, 1.03, float("inf")) == FAIL


def test_the_accuracy_line_names_its_two_sides():
    from vitrim.export.stats import paired_accuracy

    t = paired_accuracy(3, 1, 500, 0.3)
    assert "3 only the reference gets right, 1 only the engine" in t.describe()
    assert "3 only the baseline gets right, 1 only the candidate" in t.describe("the baseline", "the candidate")


def test_a_rate_is_decided_on_its_interval_not_its_point():
    """Top-1 disagreement against int8's 3%: one image of 45 (2.2%) cannot show the rate is under 3%, nor over
    it; 30 of 10000 (0.3%) can; 60 of 1000 (6%) is over it with confidence. No disagreement passes."""
    from vitrim.export.stats import FAIL, INCONCLUSIVE, PASS, rate_test

    assert rate_test(1, 45, 0.03).outcome == INCONCLUSIVE
    assert rate_test(30, 10000, 0.03).outcome == PASS
    r = rate_test(60, 1000, 0.03)
    assert r.outcome == FAIL and r.interval[0] > 0.03 and abs(r.rate - 0.06) < 1e-12
    assert rate_test(0, 45, 0.03).outcome == PASS
    assert rate_test(3, 100, 0.03).outcome == INCONCLUSIVE  # exactly at the limit never passes


def test_a_class_shift_is_decided_on_the_images_that_moved():
    """The finding: a fixed threshold failed a correct engine on a small test split (one image of 45 moved into
    a class: a 2.2% shift against int8's 1%). Now that is undecided, while a real collapse (50 of 1000 images
    moved into one class) fails, and a balanced exchange of many images passes."""
    from vitrim.export.stats import FAIL, INCONCLUSIVE, PASS, shift_test, worst_shift

    assert shift_test(3, 1, 0, 45, 0.01).outcome == INCONCLUSIVE
    t = shift_test(3, 50, 0, 1000, 0.01)
    assert t.outcome == FAIL and t.interval[0] > 0.01 and t.shift == 0.05
    assert shift_test(3, 0, 50, 1000, 0.01).outcome == FAIL  # losing a class's share fails too
    assert shift_test(3, 20, 20, 10000, 0.01).outcome == PASS
    assert shift_test(3, 0, 0, 10, 0.01).outcome == PASS
    # the decisive class: a failing one over a larger undecided shift elsewhere
    w = worst_shift([0, 50, 9], [0, 0, 0], 1000, 0.01)
    assert w.cls == 1 and w.outcome == FAIL
    w = worst_shift([1, 0], [0, 1], 45, 0.01)
    assert w.outcome == INCONCLUSIVE
