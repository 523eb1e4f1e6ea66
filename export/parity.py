"""The accuracy-parity gate: does the engine compute what PyTorch computes?

Two levels (Polygraphy's comparator plus timm's "argmax is still owl" check):

1. Error statistics per output on real validation batches, through Polygraphy's
   ``Comparator`` with per-precision ``atol``/``rtol``.
2. Top-1 agreement and the accuracy delta over a whole split.

Silent divergence happens (TensorRT #4333, #4482: wrong SDPA outputs), so a
failure raises :class:`ParityError` naming the output and the statistic; the
caller then writes no manifest.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np

from vitrim.pipeline.core.errors import UserError, VitrimError


class ParityError(VitrimError):
    """The engine diverges from PyTorch beyond the configured tolerances."""

    def __init__(self, message: str, report: dict):
        self.report = report
        super().__init__(message)


@dataclass
class Tolerances:
    atol: float
    rtol: float
    min_top1_agreement: float = 0.99
    max_acc_delta: float = 0.5  # points

    @classmethod
    def for_precision(cls, export_cfg, precision: str) -> "Tolerances":
        if precision == "fp16":
            return cls(export_cfg.atol_fp16, export_cfg.rtol_fp16, export_cfg.min_top1_agreement, export_cfg.max_acc_delta)
        if precision in ("int8", "fp8"):
            return cls(export_cfg.atol_int8, export_cfg.rtol_int8, export_cfg.min_top1_agreement_int8,
                       export_cfg.max_acc_delta_int8)
        return cls(export_cfg.atol_fp32, export_cfg.rtol_fp32, export_cfg.min_top1_agreement, export_cfg.max_acc_delta)


@dataclass
class ParityReport:
    passed: bool
    precision: str
    tolerances: dict
    outputs: dict = field(default_factory=dict)  # per output: max/mean/median abs and rel error, worst batch
    top1_agreement: float = 0.0
    torch_top1: float = 0.0
    engine_top1: float = 0.0
    acc_delta: float = 0.0
    images: int = 0
    failures: list = field(default_factory=list)
    vs_second: Optional[dict] = None  # informational: the engine against a second reference (e.g. the fp32 engine)

    def to_dict(self) -> dict:
        return asdict(self)


def _poly_runner(runner, name: str, input_name: str, output_name: str):
    """Adapt a vitrim runner to Polygraphy's ``BaseRunner`` for the Comparator."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class _Adapter(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return TensorMetadata().add(input_name, np.float32, (-1, *runner.sample_shape()))

        def infer_impl(self, feed_dict):
            import time

            t = time.perf_counter()
            out = runner.infer(feed_dict[input_name])
            self.inference_time = time.perf_counter() - t
            return OrderedDict([(output_name, out)])

    return _Adapter()


def compare_outputs(reference, engine, batches: Iterable[np.ndarray], tol: Tolerances,
                    input_name: str = "input", output_name: str = "logits") -> tuple[dict, list[str]]:
    """Level 1: Polygraphy ``Comparator`` over real batches. Returns (stats, failures)."""
    from polygraphy.comparator import Comparator, CompareFunc

    runners = [_poly_runner(reference, "torch", input_name, output_name),
               _poly_runner(engine, "engine", input_name, output_name)]
    from polygraphy.logger import G_LOGGER

    feeds = [{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # vitrim prints its own one-line summary
        results = Comparator.run(runners, data_loader=feeds)
        acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=tol.atol, rtol=tol.rtol))
    stats: dict = {}
    failures: list[str] = []
    # Polygraphy >= 0.50 returns a list of AccuracyResult (one per compare func); older ones a single dict.
    acc_list = [acc] if hasattr(acc, "items") else list(acc)
    for _pair, iterations in (kv for a in acc_list for kv in a.items()):
        for it, per_output in enumerate(iterations):
            for out_name, r in per_output.items():
                s = stats.setdefault(out_name, {"max_absdiff": 0.0, "max_reldiff": 0.0, "mean_absdiff": [],
                                                "median_absdiff": [], "batches_failed": 0, "worst_batch": None})
                if r.max_absdiff >= s["max_absdiff"]:
                    s["worst_batch"] = it
                s["max_absdiff"] = max(s["max_absdiff"], r.max_absdiff)
                s["max_reldiff"] = max(s["max_reldiff"], r.max_reldiff)
                s["mean_absdiff"].append(r.mean_absdiff)
                s["median_absdiff"].append(r.median_absdiff)
                if not bool(r):
                    s["batches_failed"] += 1
    for out_name, s in stats.items():
        s["mean_absdiff"] = float(np.mean(s["mean_absdiff"]))
        s["median_absdiff"] = float(np.median(s["median_absdiff"]))
        if s["batches_failed"]:
            failures.append(f"output '{out_name}': max_absdiff {s['max_absdiff']:.3g} (atol {tol.atol:g}) and "
                            f"max_reldiff {s['max_reldiff']:.3g} (rtol {tol.rtol:g}) in {s['batches_failed']} of "
                            f"{len(feeds)} batches (worst: batch {s['worst_batch']})")
    return stats, failures


def _np(a) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def check_parity(reference, engine, batches: Iterable[tuple], tol: Tolerances, precision: str,
                 parity_batches: int = 4, max_images: int | None = None, second=None,
                 second_name: str = "second") -> ParityReport:
    """Run both levels over a stream of ``(images, labels)`` batches; return the report.

    The stream is consumed once and never concatenated, so memory does not grow
    with the split: only the first ``parity_batches`` batches are kept, for the
    Polygraphy comparison; every batch (up to ``max_images`` images) counts for
    top-1 agreement and the accuracy delta. A ``second`` runner (for an int8
    engine: the fp32 engine) is compared with the engine in the same pass, for the
    report only.
    """
    if parity_batches < 1:
        raise UserError("export", f"export.parity_batches={parity_batches}: the output comparison needs at least one batch",
                        "set export.parity_batches >= 1")
    kept: list[np.ndarray] = []
    n = agree = ref_ok = eng_ok = agree2 = ok2 = 0
    maxdiff2 = 0.0
    for x, y in batches:
        x, y = np.ascontiguousarray(_np(x), dtype=np.float32), _np(y)
        if max_images is not None:
            if n >= max_images:
                break
            x, y = x[:max_images - n], y[:max_images - n]
        if len(kept) < parity_batches:
            kept.append(x)
        eo = engine.infer(x)
        rp, ep = reference.infer(x).argmax(1), eo.argmax(1)
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
    stats, failures = compare_outputs(reference, engine, kept, tol)
    agree_f = agree / n
    t_acc, e_acc = 100.0 * ref_ok / n, 100.0 * eng_ok / n
    delta = e_acc - t_acc
    if agree_f < tol.min_top1_agreement:
        failures.append(f"output 'logits': top-1 agreement {100 * agree_f:.2f}% < {100 * tol.min_top1_agreement:.2f}% "
                        f"over {n} images")
    if abs(delta) > tol.max_acc_delta:
        failures.append(f"output 'logits': accuracy delta {delta:+.2f} pt exceeds ±{tol.max_acc_delta} pt")
    vs = None
    if second is not None:
        vs = {"reference": second_name, "top1_agreement": agree2 / n, "reference_top1": 100.0 * ok2 / n,
              "engine_top1": e_acc, "max_absdiff": maxdiff2}
    return ParityReport(passed=not failures, precision=precision, tolerances=asdict(tol), outputs=stats,
                        top1_agreement=agree_f, torch_top1=t_acc, engine_top1=e_acc, acc_delta=delta, images=n,
                        failures=failures, vs_second=vs)
