"""The accuracy-parity gate: does the engine compute what PyTorch computes?

Two levels (the idea of Polygraphy's comparator plus timm's "argmax is still
owl" check), both over every image the gate sees (up to ``max_images``),
streamed batch by batch from one inference of each runner:

1. Error statistics per output, with the **reference** as the denominator:

   * non-finite: any NaN or Inf in either output fails by itself;
   * elementwise: ``|e - r| <= atol + rtol * |r|`` for every element (numpy
     ``isclose`` semantics; NaN never passes);
   * relative L2 error ``||e - r|| / ||r||`` per batch, the worst batch against
     ``max_rel_l2``: a scale-aware whole-output figure, so an engine whose
     outputs are scaled, sign-flipped, constant or permuted fails even where
     the elementwise tolerances are loose (int8).

   Polygraphy's ``CompareFunc.simple`` is not used for the decision: it flags an
   element only where both the absolute and the relative difference exceed
   their tolerances, with the relative one divided by the *engine's* output, so
   with int8's loose tolerances an engine returning 50x the reference logits
   passed (|50r - r| / |50r| = 0.98 < rtol 1.0). Its ``Comparator`` would also
   keep every batch's outputs, and each batch is already run once here for
   level 2.
2. Top-1 agreement and the accuracy delta over the same images.

Silent divergence happens (TensorRT #4333, #4482: wrong SDPA outputs), so a
failure raises :class:`ParityError` naming the output and the check; the caller
then writes no manifest.
"""
from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np

from vitrim.pipeline.core.errors import AccuracyGateError, UserError


class ParityError(AccuracyGateError):
    """The engine diverges from PyTorch beyond the configured tolerances (exit 3)."""


@dataclass
class Tolerances:
    """Per-precision thresholds of the gate (see :class:`~vitrim.pipeline.core.config.ExportConfig`)."""

    atol: float
    rtol: float
    min_top1_agreement: float = 0.99
    max_acc_delta: float = 0.5  # points
    max_rel_l2: float = 1e-4  # worst batch's ||e - r|| / ||r|| (ExportConfig's fp32 default)

    @classmethod
    def for_precision(cls, export_cfg, precision: str) -> "Tolerances":
        e = export_cfg
        if precision == "bf16":  # interim, until bf16 has fields of its own: fp16's, scaled by the ratio of the
            # formats' unit roundoff (bf16 keeps 8 significand bits, fp16 11: 2^-8 / 2^-11 = 8)
            k = 8.0
            return cls(k * e.atol_fp16, k * e.rtol_fp16, e.min_top1_agreement, e.max_acc_delta, k * e.max_rel_l2_fp16)
        if precision == "fp16":
            return cls(e.atol_fp16, e.rtol_fp16, e.min_top1_agreement, e.max_acc_delta, e.max_rel_l2_fp16)
        if precision in ("int8", "fp8"):
            return cls(e.atol_int8, e.rtol_int8, e.min_top1_agreement_int8, e.max_acc_delta_int8, e.max_rel_l2_int8)
        return cls(e.atol_fp32, e.rtol_fp32, e.min_top1_agreement, e.max_acc_delta, e.max_rel_l2_fp32)


@dataclass
class ParityReport:
    passed: bool
    precision: str
    tolerances: dict
    outputs: dict = field(default_factory=dict)  # per output: see OutputErrors.to_dict
    top1_agreement: float = 0.0
    torch_top1: float = 0.0
    engine_top1: float = 0.0
    acc_delta: float = 0.0
    images: int = 0
    failures: list = field(default_factory=list)
    vs_second: Optional[dict] = None  # informational: the engine against a second reference (e.g. the fp32 engine)

    def to_dict(self) -> dict:
        return asdict(self)


class OutputErrors:
    """Streaming error statistics of one output, engine against reference, with the reference as denominator.

    ``add`` takes one batch and keeps only running sums, maxima and the ``keep_worst``
    worst batches' figures, so memory does not grow with the number of batches.
    """

    def __init__(self, name: str, tol: "Tolerances", keep_worst: int = 4):
        self.name, self.tol, self.keep_worst = name, tol, max(1, keep_worst)
        self.batches = self.elements = self.finite = self.mismatched = self.mismatched_nonfinite = 0
        self.nonfinite_engine = self.nonfinite_reference = 0
        self.shape_mismatch: Optional[str] = None
        self.max_absdiff = self.max_reldiff = self.max_over_allowed = 0.0
        self.sum_absdiff = self.sum_sq_diff = self.sum_sq_ref = 0.0
        self.max_rel_l2, self.worst_batch = 0.0, 0
        self._worst: list[tuple[float, int, float]] = []  # min-heap of (rel_l2, batch, max_absdiff)

    def add(self, ref: np.ndarray, eng: np.ndarray) -> None:
        i = self.batches
        self.batches += 1
        if np.shape(ref) != np.shape(eng):
            if self.shape_mismatch is None:
                self.shape_mismatch = f"shape {tuple(np.shape(eng))} differs from the reference's " \
                                      f"{tuple(np.shape(ref))} (batch {i})"
            return
        r, e = np.asarray(ref, dtype=np.float64), np.asarray(eng, dtype=np.float64)
        self.elements += r.size
        fin_r, fin_e = np.isfinite(r), np.isfinite(e)
        self.nonfinite_reference += int((~fin_r).sum())
        self.nonfinite_engine += int((~fin_e).sum())
        ok = fin_r & fin_e
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(e - r)
            allowed = self.tol.atol + self.tol.rtol * np.abs(r)
            # isclose semantics with the reference as denominator; NaN compares False, so it mismatches
            bad = ~(d <= allowed)
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
        if ok.all():
            sq_d, sq_r = float((d * d).sum()), float((r * r).sum())
            self.sum_sq_diff += sq_d
            self.sum_sq_ref += sq_r
            rel = np.sqrt(sq_d / sq_r) if sq_r > 0 else (0.0 if sq_d == 0 else np.inf)
        else:
            rel = np.inf  # a batch with NaN/Inf has no finite error; the non-finite check names it
        rel = float(rel)
        if rel > self.max_rel_l2:
            self.max_rel_l2, self.worst_batch = rel, i
        item = (rel, i, float(d[ok].max()) if ok.any() else float("nan"))
        if len(self._worst) < self.keep_worst:
            heapq.heappush(self._worst, item)
        elif item[0] > self._worst[0][0]:
            heapq.heapreplace(self._worst, item)

    @property
    def rel_l2(self) -> float:
        """The relative L2 error over every finite batch together."""
        if self.sum_sq_ref > 0:
            return float(np.sqrt(self.sum_sq_diff / self.sum_sq_ref))
        return 0.0 if self.sum_sq_diff == 0 else float("inf")

    def failures(self) -> list[str]:
        """One line per failed check, each naming the output and the check."""
        t, out, f = self.tol, f"output '{self.name}'", []
        if self.shape_mismatch:
            f.append(f"{out}: {self.shape_mismatch}")
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
        if not self.max_rel_l2 <= t.max_rel_l2:
            why = " (NaN/Inf there)" if np.isinf(self.max_rel_l2) and self.nonfinite_engine + self.nonfinite_reference \
                else ""
            f.append(f"{out}: relative L2 error {self.max_rel_l2:.3g} > {t.max_rel_l2:g} (||engine - reference|| / "
                     f"||reference||, worst: batch {self.worst_batch}{why} of {self.batches}; {self.rel_l2:.3g} over "
                     f"the finite batches)")
        return f

    def to_dict(self) -> dict:
        """The figures for ``parity.json``; a non-finite figure (a batch with NaN/Inf) is written as null."""
        fin = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731 - strict JSON has no NaN/Infinity
        return {"elements": self.elements, "batches": self.batches, "max_absdiff": self.max_absdiff,
                "mean_absdiff": self.sum_absdiff / self.finite if self.finite else 0.0,
                "max_reldiff": self.max_reldiff, "mismatched": self.mismatched,
                "max_over_allowed": fin(self.max_over_allowed), "max_rel_l2": fin(self.max_rel_l2),
                "worst_batch": self.worst_batch, "rel_l2": fin(self.rel_l2),
                "nonfinite_engine": self.nonfinite_engine, "nonfinite_reference": self.nonfinite_reference,
                "shape_mismatch": self.shape_mismatch,
                "worst_batches": [{"batch": b, "rel_l2": fin(r), "max_absdiff": fin(a)}
                                  for r, b, a in sorted(self._worst, key=lambda w: (-w[0], w[1]))]}


def _np(a) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def check_parity(reference, engine, batches: Iterable[tuple], tol: Tolerances, precision: str,
                 parity_batches: int = 4, max_images: int | None = None, second=None,
                 second_name: str = "second", output_name: str = "logits") -> ParityReport:
    """Run both levels over a stream of ``(images, labels)`` batches; return the report.

    The stream is consumed once and never concatenated, so memory does not grow
    with the split: each batch (up to ``max_images`` images) is run once on each
    runner, and its outputs feed the error statistics and the top-1 checks before
    the next batch is read. ``parity_batches`` is how many of the worst batches (by
    relative L2 error) the report details. A ``second`` runner (for an int8
    engine: the fp32 engine) is compared with the engine in the same pass, for
    the report only.
    """
    if parity_batches < 1:
        raise UserError("export", f"export.parity_batches={parity_batches}: the report details at least the worst "
                        "batch", "set export.parity_batches >= 1")
    errors = OutputErrors(output_name, tol, parity_batches)
    n = agree = ref_ok = eng_ok = agree2 = ok2 = 0
    maxdiff2 = 0.0
    for x, y in batches:
        x, y = np.ascontiguousarray(_np(x), dtype=np.float32), _np(y)
        if max_images is not None:
            if n >= max_images:
                break
            x, y = x[:max_images - n], y[:max_images - n]
        ro, eo = reference.infer(x), engine.infer(x)
        errors.add(ro, eo)
        rp, ep = ro.argmax(1), eo.argmax(1)
        if second is not None:
            so = second.infer(x)
            agree2 += int((so.argmax(1) == ep).sum())
            ok2 += int((so.argmax(1) == y).sum())
            maxdiff2 = max(maxdiff2, float(np.abs(so.astype(np.float64) - eo).max()))
        agree += int((rp == ep).sum())
        ref_ok += int((rp == y).sum())
        eng_ok += int((ep == y).sum())
        n += len(x)
    if n == 0:
        raise UserError("export", "the parity gate got no images", "check the data split (data.test_limit, "
                        "export.parity_images) and data.root")
    failures = errors.failures()
    agree_f = agree / n
    t_acc, e_acc = 100.0 * ref_ok / n, 100.0 * eng_ok / n
    delta = e_acc - t_acc
    if agree_f < tol.min_top1_agreement:
        failures.append(f"output '{output_name}': top-1 agreement {100 * agree_f:.2f}% < "
                        f"{100 * tol.min_top1_agreement:.2f}% over {n} images")
    if abs(delta) > tol.max_acc_delta:
        failures.append(f"output '{output_name}': accuracy delta {delta:+.2f} pt exceeds ±{tol.max_acc_delta} pt")
    vs = None
    if second is not None:
        vs = {"reference": second_name, "top1_agreement": agree2 / n, "reference_top1": 100.0 * ok2 / n,
              "engine_top1": e_acc, "max_absdiff": maxdiff2}
    return ParityReport(passed=not failures, precision=precision, tolerances=asdict(tol),
                        outputs={output_name: errors.to_dict()}, top1_agreement=agree_f, torch_top1=t_acc,
                        engine_top1=e_acc, acc_delta=delta, images=n, failures=failures, vs_second=vs)
