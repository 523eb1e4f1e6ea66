"""The accuracy-parity gate: does the engine compute what PyTorch computes?

Every statistic is **per image**, streamed batch by batch from one inference of
each runner, so the loader's batch (``target.batch``, a latency knob) cannot
change a verdict. Two levels (Polygraphy's comparator plus timm's "argmax is
still owl" check):

1. What the engine outputs, against the reference (the reference is always the
   denominator):

   * non-finite: any NaN or Inf in either output fails by itself;
   * elementwise: ``|e - r| <= atol + rtol * |r|`` for every element (numpy
     ``isclose`` semantics; NaN never passes);
   * relative L2 error ``||e_i - r_i|| / ||r_i||`` of each image's logits: the worst
     image (a zeroed or corrupted image) and the mean over images (a scaled,
     sign-flipped, constant or permuted output);
   * what a deployed classifier returns: the Jensen-Shannon divergence (bits)
     between the softmax of each image's logits, its mean and a high quantile
     (a temperature change, a biased class logit), and the distribution of the
     predicted classes: no class may gain or lose more than ``max_class_shift``
     of the predictions (a class collapsed onto another).

   Polygraphy's ``CompareFunc.simple`` is not used for the decision: it divides
   the relative difference by the *engine's* output, so with int8's loose
   tolerances an engine returning 50x the logits passed.
2. The decisions: top-1 agreement with the reference, and the accuracy loss,
   decided by McNemar's exact test on the paired predictions
   (:func:`~vitrim.export.stats.paired_accuracy`): PASS only when the loss is
   below ``max_acc_loss`` with confidence, FAIL when above it with confidence,
   INCONCLUSIVE otherwise (too few images for the tolerance: evaluate more).

Silent divergence happens (TensorRT #4333, #4482: wrong SDPA outputs), so a
failure raises :class:`ParityError` naming the output and the check, an
undecided gate :class:`ParityInconclusive`; the caller then writes no manifest.
"""
from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np

from vitrim.export.stats import FAIL, INCONCLUSIVE, PASS, paired_accuracy, rate_test, worst_shift
from vitrim.pipeline.core.errors import AccuracyGateError, InconclusiveError, UserError


class ParityError(AccuracyGateError):
    """The engine diverges from PyTorch beyond the configured tolerances (exit 3)."""


class ParityInconclusive(InconclusiveError):
    """Nothing failed, but the images cannot show that the accuracy loss is within tolerance (exit 6)."""


@dataclass
class Tolerances:
    """One precision's thresholds (:class:`~vitrim.pipeline.core.config.ParityTolerance`) plus the gate's
    confidence and quantile (see :class:`~vitrim.pipeline.core.config.ExportConfig`)."""

    atol: float
    rtol: float
    max_rel_l2: float = 1e-4
    max_mean_rel_l2: float = 1e-5
    max_prob_js: float = 1e-6
    max_mean_prob_js: float = 1e-7
    max_class_shift: float = 0.002
    min_top1_agreement: float = 0.99
    max_acc_loss: float = 0.5  # points
    confidence: float = 0.95
    quantile: float = 0.99

    @classmethod
    def for_precision(cls, export_cfg, precision: str) -> "Tolerances":
        t = export_cfg.tolerance(precision)
        return cls(**asdict(t), confidence=export_cfg.confidence, quantile=export_cfg.parity_quantile)


@dataclass
class ParityReport:
    passed: bool
    precision: str
    tolerances: dict
    outcome: str = PASS  # pass | fail | inconclusive
    outputs: dict = field(default_factory=dict)  # per output: see OutputErrors.to_dict
    top1_agreement: float = 0.0
    torch_top1: float = 0.0
    engine_top1: float = 0.0
    acc_delta: float = 0.0
    accuracy: dict = field(default_factory=dict)  # PairedAccuracy.to_dict: the loss, its interval, the decision
    class_shift: dict = field(default_factory=dict)  # the decisive class's shift, its interval and the decision
    agreement: dict = field(default_factory=dict)  # RateTest.to_dict of the top-1 disagreements
    images: int = 0
    failures: list = field(default_factory=list)
    undecided: list = field(default_factory=list)  # checks that could not decide (INCONCLUSIVE)
    vs_second: Optional[dict] = None  # informational: the engine against a second reference (e.g. the fp32 engine)

    def to_dict(self) -> dict:
        return asdict(self)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def js_divergence(ref_logits: np.ndarray, eng_logits: np.ndarray) -> np.ndarray:
    """Per row, the Jensen-Shannon divergence (bits, in [0, 1]) between the two softmax distributions."""
    from scipy.special import rel_entr

    p, q = _softmax(ref_logits), _softmax(eng_logits)
    m = 0.5 * (p + q)
    js = 0.5 * (rel_entr(p, m).sum(1) + rel_entr(q, m).sum(1)) / np.log(2.0)
    return np.clip(js, 0.0, 1.0)


class OutputErrors:
    """Streaming per-image error statistics of one output, engine against reference.

    ``add`` takes one batch and keeps running sums and maxima, plus one float per image for the
    relative L2 error and the probability divergence (for the quantiles; images are never kept).
    """

    def __init__(self, name: str, tol: Tolerances, keep_worst: int = 4):
        self.name, self.tol, self.keep_worst = name, tol, max(1, keep_worst)
        self.images = self.elements = self.finite = self.mismatched = self.mismatched_nonfinite = 0
        self.nonfinite_engine = self.nonfinite_reference = 0
        self.shape_mismatch: Optional[str] = None
        self.max_absdiff = self.max_reldiff = self.max_over_allowed = 0.0
        self.sum_absdiff = 0.0
        self._rel: list[np.ndarray] = []  # per image ||e - r|| / ||r|| (inf where not finite)
        self._js: list[np.ndarray] = []  # per image JS divergence of the softmax (nan where not finite)
        self._worst: list[tuple[float, int, float]] = []  # min-heap of (rel_l2, image, js)

    def add(self, ref: np.ndarray, eng: np.ndarray) -> None:
        first = self.images
        if np.shape(ref) != np.shape(eng):
            if self.shape_mismatch is None:
                self.shape_mismatch = f"shape {tuple(np.shape(eng))} differs from the reference's " \
                                      f"{tuple(np.shape(ref))} (images from {first})"
            self.images += len(ref)
            return
        r = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
        e = np.asarray(eng, dtype=np.float64).reshape(len(eng), -1)
        self.images += len(r)
        self.elements += r.size
        fin_r, fin_e = np.isfinite(r), np.isfinite(e)
        self.nonfinite_reference += int((~fin_r).sum())
        self.nonfinite_engine += int((~fin_e).sum())
        ok = fin_r & fin_e
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(e - r)
            allowed = self.tol.atol + self.tol.rtol * np.abs(r)
            bad = ~(d <= allowed)  # isclose semantics, the reference as denominator; NaN compares False
        self.mismatched += int(bad.sum())
        self.mismatched_nonfinite += int((bad & ~ok).sum())
        if ok.any():
            dk, rk, ak = d[ok], np.abs(r[ok]), allowed[ok]
            self.max_absdiff = max(self.max_absdiff, float(dk.max()))
            self.sum_absdiff += float(dk.sum())
            self.finite += dk.size
            nz = rk > 0
            if nz.any():  # informational: an element whose reference is ~0 has no meaningful ratio
                self.max_reldiff = max(self.max_reldiff, float((dk[nz] / rk[nz]).max()))
            over = np.divide(dk, ak, out=np.where(dk > 0, np.inf, 0.0), where=ak > 0)
            self.max_over_allowed = max(self.max_over_allowed, float(over.max()))
        row_ok = ok.all(axis=1)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            num = np.sqrt((np.where(ok, d, 0.0) ** 2).sum(1))
            den = np.sqrt((np.where(ok, r, 0.0) ** 2).sum(1))
            rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
        rel = np.where(row_ok, rel, np.inf)  # an image with NaN/Inf has no finite error; the non-finite check names it
        js = np.full(len(r), np.nan)
        if row_ok.any():
            js[row_ok] = js_divergence(r[row_ok], e[row_ok])
        self._rel.append(rel.astype(np.float64))
        self._js.append(js)
        for k in np.argsort(-rel)[: self.keep_worst]:
            item = (float(rel[k]), first + int(k), float(js[k]))
            if len(self._worst) < self.keep_worst:
                heapq.heappush(self._worst, item)
            elif item[0] > self._worst[0][0]:
                heapq.heapreplace(self._worst, item)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rel = np.concatenate(self._rel) if self._rel else np.zeros(0)
        js = np.concatenate(self._js) if self._js else np.zeros(0)
        return rel, js

    def figures(self) -> dict:
        """Worst, mean and quantile of the per-image statistics (inf/NaN where an image was not finite)."""
        rel, js = self._arrays()
        q = self.tol.quantile
        if rel.size == 0:
            return {"max_rel_l2": 0.0, "mean_rel_l2": 0.0, "q_rel_l2": 0.0, "worst_image": 0,
                    "q_prob_js": 0.0, "mean_prob_js": 0.0, "max_prob_js": 0.0}
        finite_js = np.isfinite(js).all()
        with np.errstate(invalid="ignore"):
            return {"max_rel_l2": float(rel.max()), "mean_rel_l2": float(rel.mean()),
                    "q_rel_l2": float(np.quantile(rel, q)), "worst_image": int(np.argmax(rel)),
                    "q_prob_js": float(np.quantile(js, q)) if finite_js else float("inf"),
                    "mean_prob_js": float(js.mean()) if finite_js else float("inf"),
                    "max_prob_js": float(js.max()) if finite_js else float("inf")}

    def failures(self) -> list[str]:
        """One line per failed check, each naming the output and the check."""
        t, out, f = self.tol, f"output '{self.name}'", []
        g = self.figures()
        if self.shape_mismatch:
            f.append(f"{out}: {self.shape_mismatch}")
            return f
        if self.nonfinite_engine:
            f.append(f"{out}: non-finite values: {self.nonfinite_engine} NaN/Inf of {self.elements} in the engine's "
                     "output")
        if self.nonfinite_reference:
            f.append(f"{out}: non-finite values: {self.nonfinite_reference} NaN/Inf of {self.elements} in the "
                     "reference's output (nothing can be compared there)")
        if self.mismatched:
            nan = f"{self.mismatched_nonfinite} of them NaN/Inf; " if self.mismatched_nonfinite else ""
            f.append(f"{out}: elementwise |engine - reference| <= atol + rtol*|reference| fails for {self.mismatched} "
                     f"of {self.elements} elements ({nan}max_absdiff {self.max_absdiff:.3g}, worst finite element "
                     f"{self.max_over_allowed:.3g}x its allowance; atol {t.atol:g}, rtol {t.rtol:g})")
        if not g["max_rel_l2"] <= t.max_rel_l2:
            f.append(f"{out}: relative L2 error of the worst image {g['max_rel_l2']:.3g} > {t.max_rel_l2:g} "
                     f"(||engine - reference|| / ||reference|| of image {g['worst_image']} of {self.images})")
        if not g["mean_rel_l2"] <= t.max_mean_rel_l2:
            f.append(f"{out}: mean relative L2 error {g['mean_rel_l2']:.3g} > {t.max_mean_rel_l2:g} over "
                     f"{self.images} images")
        if not g["q_prob_js"] <= t.max_prob_js:
            f.append(f"{out}: probability divergence at the {100 * t.quantile:g}th percentile of images "
                     f"{g['q_prob_js']:.3g} > {t.max_prob_js:g} (Jensen-Shannon, bits, softmax of engine vs "
                     "reference)")
        if not g["mean_prob_js"] <= t.max_mean_prob_js:
            f.append(f"{out}: mean probability divergence {g['mean_prob_js']:.3g} > {t.max_mean_prob_js:g} "
                     f"(Jensen-Shannon, bits, over {self.images} images)")
        return f

    def to_dict(self) -> dict:
        """The figures for ``parity.json``; a non-finite figure is written as null (strict JSON)."""
        fin = lambda v: float(v) if v is not None and np.isfinite(v) else None  # noqa: E731
        g = self.figures()
        return {"elements": self.elements, "images": self.images, "max_absdiff": self.max_absdiff,
                "mean_absdiff": self.sum_absdiff / self.finite if self.finite else 0.0,
                "max_reldiff": self.max_reldiff, "mismatched": self.mismatched,
                "max_over_allowed": fin(self.max_over_allowed),
                "max_rel_l2": fin(g["max_rel_l2"]), "mean_rel_l2": fin(g["mean_rel_l2"]),
                "q_rel_l2": fin(g["q_rel_l2"]), "worst_image": g["worst_image"],
                "q_prob_js": fin(g["q_prob_js"]), "mean_prob_js": fin(g["mean_prob_js"]),
                "max_prob_js": fin(g["max_prob_js"]), "quantile": self.tol.quantile,
                "nonfinite_engine": self.nonfinite_engine, "nonfinite_reference": self.nonfinite_reference,
                "shape_mismatch": self.shape_mismatch,
                "worst_images": [{"image": i, "rel_l2": fin(r), "prob_js": fin(j)}
                                 for r, i, j in sorted(self._worst, key=lambda w: (-w[0], w[1]))]}


def _np(a) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def class_shift(ref_counts: np.ndarray, moved_in: np.ndarray, moved_out: np.ndarray, n: int, limit: float,
                confidence: float = 0.95) -> dict:
    """The predicted-class distribution's shift, decided per class on its interval (:func:`worst_shift`).

    ``moved_in[c]``: images the engine puts in class ``c`` and the reference does not; ``moved_out[c]``
    the reverse. Returns the decisive class (a failing one, else an undecided one, else the one that
    moved most) with its counts, shift, interval and outcome, and the largest absolute shift of any class.
    """
    t = worst_shift(moved_in, moved_out, n, limit, confidence)
    k = t.cls
    diff = (np.asarray(moved_in) - np.asarray(moved_out)) / max(n, 1)
    ref = int(ref_counts[k]) if len(ref_counts) else 0
    return {"class": k, "shift": t.shift, "reference": ref, "engine": ref + t.moved_in - t.moved_out,
            "moved_in": t.moved_in, "moved_out": t.moved_out, "interval": list(t.interval),
            "outcome": t.outcome, "max_abs_shift": float(np.abs(diff).max()) if diff.size else 0.0}


def check_parity(reference, engine, batches: Iterable[tuple], tol: Tolerances, precision: str,
                 worst: int = 4, max_images: int | None = None, second=None,
                 second_name: str = "second", output_name: str = "logits") -> ParityReport:
    """Run both levels over a stream of ``(images, labels)`` batches; return the report.

    The stream is consumed once and never concatenated: each batch (up to ``max_images``
    images in all) is run once on each runner, and its outputs feed the per-image statistics
    before the next batch is read. ``worst`` is how many of the worst images (by relative L2
    error) the report details. A ``second`` runner (for an int8 engine: the fp32 engine) is
    compared with the engine in the same pass, for the report only.
    """
    if worst < 1:
        raise UserError("export", f"export.parity_worst={worst}: the report details at least the worst image",
                        "set export.parity_worst >= 1")
    errors = OutputErrors(output_name, tol, worst)
    n = agree = ref_ok = eng_ok = only_ref = only_eng = agree2 = ok2 = 0
    maxdiff2 = 0.0
    ref_counts = moved_in = moved_out = None
    for x, y in batches:
        x, y = np.ascontiguousarray(_np(x), dtype=np.float32), _np(y)
        if max_images is not None:
            if n >= max_images:
                break
            x, y = x[:max_images - n], y[:max_images - n]
        ro, eo = reference.infer(x), engine.infer(x)
        errors.add(ro, eo)
        ro2 = np.asarray(ro).reshape(len(x), -1)
        rp = ro2.argmax(1)
        if np.shape(eo) == np.shape(ro):  # NaN logits have no class: such an image counts as a wrong answer
            eo2 = np.asarray(eo).reshape(len(x), -1)
            ep = np.where(np.isfinite(eo2).all(1), eo2.argmax(1), -1)
        else:  # the shape check names it; no image has a class
            ep = np.full(len(x), -1)
        classes = ro2.shape[1]
        if ref_counts is None:
            ref_counts, moved_in, moved_out = (np.zeros(classes, np.int64) for _ in range(3))
        ref_counts += np.bincount(rp, minlength=classes)[:classes]
        moved = rp != ep  # an image without a class (NaN) leaves its reference class and enters none
        moved_in += np.bincount(ep[moved & (ep >= 0)], minlength=classes)[:classes]
        moved_out += np.bincount(rp[moved], minlength=classes)[:classes]
        if second is not None:
            so = second.infer(x)
            agree2 += int((so.argmax(1) == ep).sum())
            ok2 += int((so.argmax(1) == y).sum())
            maxdiff2 = max(maxdiff2, float(np.abs(so.astype(np.float64) - eo).max()))
        r_right, e_right = rp == y, ep == y
        agree += int((rp == ep).sum())
        ref_ok += int(r_right.sum())
        eng_ok += int(e_right.sum())
        only_ref += int((r_right & ~e_right).sum())
        only_eng += int((e_right & ~r_right).sum())
        n += len(x)
    if n == 0:
        raise UserError("export", "the parity gate got no images", "check the data split (data.test_limit, "
                        "export.parity_images) and data.root")
    failures = errors.failures()
    agree_f = agree / n
    t_acc, e_acc = 100.0 * ref_ok / n, 100.0 * eng_ok / n
    undecided = []
    more = "; evaluate more images (data.test_limit, export.parity_images) or allow more"
    shift = class_shift(ref_counts, moved_in, moved_out, n, tol.max_class_shift, tol.confidence)
    lo, hi = shift["interval"]
    said = (f"output '{output_name}': predicted-class distribution: class {shift['class']} "
            f"{'gains' if shift['shift'] > 0 else 'loses'} {100 * abs(shift['shift']):.2f}% of the {n} images "
            f"({shift['reference']} -> {shift['engine']} predictions; {shift['moved_in']} moved in, "
            f"{shift['moved_out']} out; {100 * tol.confidence:g}% interval [{100 * lo:+.2f}, {100 * hi:+.2f}]%), "
            f"allowed +-{100 * tol.max_class_shift:g}%")
    if shift["outcome"] == FAIL:
        failures.append(said)
    elif shift["outcome"] == INCONCLUSIVE:
        undecided.append(said + more + " (export.<precision>.max_class_shift)")
    agreement = rate_test(n - agree, n, 1.0 - tol.min_top1_agreement, tol.confidence)
    lo, hi = agreement.interval
    said = (f"output '{output_name}': top-1 agreement {100 * agree_f:.2f}% over {n} images ({n - agree} "
            f"disagree; {100 * tol.confidence:g}% interval of the disagreement [{100 * lo:.2f}, {100 * hi:.2f}]%), "
            f"required {100 * tol.min_top1_agreement:.2f}%")
    if agreement.outcome == FAIL:
        failures.append(said)
    elif agreement.outcome == INCONCLUSIVE:
        undecided.append(said + more + " (export.<precision>.min_top1_agreement)")
    acc = paired_accuracy(only_ref, only_eng, n, tol.max_acc_loss, tol.confidence)
    if acc.outcome == FAIL:
        failures.append(f"output '{output_name}': accuracy loss above {tol.max_acc_loss:g} pt with confidence: "
                        + acc.describe())
    elif acc.outcome == INCONCLUSIVE:
        undecided.append(f"output '{output_name}': accuracy loss undecided: " + acc.describe()
                         + more + " (export.<precision>.max_acc_loss)")
    outcome = FAIL if failures else INCONCLUSIVE if undecided else PASS
    vs = None
    if second is not None:
        vs = {"reference": second_name, "top1_agreement": agree2 / n, "reference_top1": 100.0 * ok2 / n,
              "engine_top1": e_acc, "max_absdiff": maxdiff2}
    return ParityReport(passed=outcome == PASS, precision=precision, tolerances=asdict(tol), outcome=outcome,
                        outputs={output_name: errors.to_dict()}, top1_agreement=agree_f, torch_top1=t_acc,
                        engine_top1=e_acc, acc_delta=e_acc - t_acc, accuracy=acc.to_dict(), class_shift=shift,
                        agreement=agreement.to_dict(),
                        images=n, failures=failures, undecided=undecided, vs_second=vs)
