"""Backend runners behind one small interface (Polygraphy-style context managers).

Every runner loads a model, runs inference on numpy input, and times itself at
a batch with warm-up and repeats. Profiling (the LUT), engine measurement and
the parity gate all use these, so a latency in the LUT and a latency in the
manifest come from the same code.

Each backend's runners live in its module of :mod:`vitrim.export.backends`
(``OrtCpuRunner``, ``OpenVinoRunner``, ``TrtRunner``, ``TorchExportRunner``); here are the
base class, :class:`TorchRunner` (eager PyTorch on CPU or CUDA: the parity gate's
reference for every backend, and the torch targets' profiling runner) and the one
side-by-side timing guard, :func:`interleaved`, with its timing functions.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from vitrim.pipeline.core.errors import UserError

@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    samples_ms: list = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "Timing":
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 90)), float(a.mean()), float(a.min()), len(a),
                   [float(s) for s in a])

    def to_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d


class Runner:
    """Load once, then ``infer`` and ``time``; use as a context manager."""

    name = "runner"

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:  # pragma: no cover - trivial
        pass

    def deactivate(self) -> None:  # pragma: no cover - trivial
        pass

    def infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (without the batch dim)."""
        raise NotImplementedError

    def _run_once(self) -> float:
        """One timed run on the prepared input, in ms."""
        raise NotImplementedError

    def _prepare(self, batch: int, seed: int = 0) -> None:
        raise NotImplementedError

    def time(self, batch: int, warmup: int = 10, repeats: int = 50, seed: int = 0) -> Timing:
        self._prepare(batch, seed)
        for _ in range(warmup):
            self._run_once()
        return Timing.from_samples([self._run_once() for _ in range(repeats)])

    def time_samples(self, batch: int, repeats: int, warmup: int = 0, seed: int = 0) -> list[float]:
        """Raw samples, for interleaved measurement of several runners."""
        self._prepare(batch, seed)
        for _ in range(warmup):
            self._run_once()
        return [self._run_once() for _ in range(repeats)]


class tf32_off:
    """Context manager: fp32 matmuls and convolutions in full fp32 on CUDA (TF32 off), the caller's flags restored.

    cuDNN allows TF32 by default, so a "fp32" torch reference on an Ampere+ GPU
    would carry ~1e-3 relative error against a true-fp32 engine checked at atol
    1e-4. The flags are process-global; only CUDA kernels read them, so setting
    them on a CPU-only machine is harmless. torch >= 2.9 has a second TF32 API
    (``fp32_precision``) and refuses to read the legacy flags once the two
    disagree, so the flags are saved and restored through whichever API the
    current state can be read with.
    """

    def __enter__(self) -> "tf32_off":
        import torch

        b = torch.backends
        try:  # the legacy API, readable unless the caller set TF32 through the new one
            self._saved = ("legacy", torch.get_float32_matmul_precision(), b.cudnn.allow_tf32)
            torch.set_float32_matmul_precision("highest")
            b.cudnn.allow_tf32 = False
        except RuntimeError:  # torch >= 2.9 with the new API in use: stay on it
            knobs = [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
            self._saved = ("new", knobs, [k.fp32_precision for k in knobs])
            for k in knobs:
                k.fp32_precision = "ieee"
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self._saved[0] == "legacy":
            torch.set_float32_matmul_precision(self._saved[1])
            torch.backends.cudnn.allow_tf32 = self._saved[2]
        else:
            for k, v in zip(self._saved[1], self._saved[2]):
                k.fp32_precision = v


class TorchRunner(Runner):
    """Eager PyTorch; CUDA events on a GPU. fp32 inference runs with TF32 off (:class:`tf32_off`)."""

    def __init__(self, model, sample_shape: tuple[int, ...], device: str = "cpu", threads: int | None = None,
                 half: bool = False):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        self.name = "torch-cuda" if self.cuda else "torch-cpu"
        if self.cuda and not torch.cuda.is_available():
            raise UserError("target", "torch-cuda target but no CUDA device is visible", "use torch-cpu or ort-cpu")
        # A private copy: moving or halving the caller's module in place would make a parity
        # gate compare a model with itself (or crash on the caller's next fp32/CPU use).
        import copy

        self.model = copy.deepcopy(model).eval().to(device)
        self.half = half
        if half:
            self.model = self.model.half()
        self._shape = tuple(sample_shape)
        self.threads = threads

    def activate(self) -> None:
        if self.threads and not self.cuda:
            self._old_threads = self.torch.get_num_threads()
            self.torch.set_num_threads(self.threads)

    def deactivate(self) -> None:
        if getattr(self, "_old_threads", None):
            self.torch.set_num_threads(self._old_threads)

    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def numerics(self):
        """The context every inference and timed run executes in: TF32 off unless the runner is fp16.

        Not conditioned on the device (the flags only act on CUDA), so a test on a
        CPU-only machine runs the very path a CUDA fp32 reference takes.
        """
        from contextlib import nullcontext

        return nullcontext() if self.half else tf32_off()

    def infer(self, x: np.ndarray) -> np.ndarray:
        t = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with self.torch.inference_mode(), self.numerics():
            out = self.model(t.half() if self.half else t)
        return out.float().cpu().numpy()

    def _prepare(self, batch: int, seed: int = 0) -> None:
        g = self.torch.Generator().manual_seed(seed)
        x = self.torch.randn((batch, *self._shape), generator=g).to(self.device)
        self._x = x.half() if self.half else x

    def _run_once(self) -> float:
        torch = self.torch
        with torch.inference_mode(), self.numerics():  # timed as it was gated
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.model(self._x)
                end.record()
                end.synchronize()
                return start.elapsed_time(end)
            t = time.perf_counter()
            self.model(self._x)
            return (time.perf_counter() - t) * 1e3


@contextlib.contextmanager
def interleaved(runners: Sequence[Runner]) -> Iterator[list[Runner]]:
    """Activate every runner for side-by-side timing; deactivate them all on exit, even after an error.

    The one guard around :func:`time_interleaved` and :func:`time_ratio` (Polygraphy's
    ``activate()``/``deactivate()`` pattern): callers never activate runners by hand.
    """
    active: list[Runner] = []
    try:
        for r in runners:
            r.activate()
            active.append(r)
        yield list(runners)
    finally:
        for r in reversed(active):
            r.deactivate()


def time_interleaved(runners: list[Runner], batch: int, repeats: int = 30, rounds: int = 6, warmup: int = 10,
                     discard: int = 1) -> list[Timing]:
    """Time several (activated) runners round-robin, so drifts of a shared machine hit all alike.

    Each of ``rounds`` visits runs ``discard`` untimed runs, then ``repeats // rounds``
    timed ones; the median over all timed samples is reported per runner.
    """
    per_visit = max(1, repeats // max(1, rounds))
    samples: list[list[float]] = [[] for _ in runners]
    for r in runners:
        r._prepare(batch)
        for _ in range(warmup):
            r._run_once()
    for _ in range(max(1, rounds)):
        for i, r in enumerate(runners):
            for _ in range(discard):
                r._run_once()
            samples[i] += [r._run_once() for _ in range(per_visit)]
    return [Timing.from_samples(s) for s in samples]


def time_ratio(runners: list[Runner], batch: int, repeats: int, rounds: int, warmup: int) -> tuple[list[Timing],
                                                                                                   list[float]]:
    """Time ``runners[1:]`` each bracketed by the reference ``runners[0]``: T P1 T P2 ... T Pn T, ``rounds`` times.

    On a shared machine the load changes within one round-robin pass (a pass over
    16 DeiT-sized models takes a minute), so the median of a plan against the
    median of the teacher is biased by where the bursts fell. Each plan visit is
    divided by the teacher visits right before and after it, and the ratio is the
    median of those per-visit ratios. Returns (timings, ratios of runners[1:] to runners[0]).
    """
    timings, visits = time_ratio_visits(runners, batch, repeats, rounds, warmup)
    return timings, [float(np.median(v)) for v in visits]


DISCARD_BELOW_MS = 20.0  # a visit's first run is discarded for runners faster than this (cold caches matter)


def time_ratio_visits(runners: list[Runner], batch: int, repeats: int, rounds: int, warmup: int,
                      min_visit_ms: float = 0.0) -> tuple[list[Timing], list[list[float]]]:
    """:func:`time_ratio`, returning every visit's ratio (one per round) for ``runners[1:]``: their spread
    is the measurement's own noise estimate.

    ``min_visit_ms``: a visit runs at least this long (half of it for the reference), whatever
    ``repeats`` says: a visit of four 3-ms runs is at the mercy of one scheduler hiccup, so short
    micro-models get more runs per visit (the warm-up runs estimate each one's time). A visit's first run
    is discarded (cold caches after the switch) for runners under ``DISCARD_BELOW_MS`` only: what a switch
    costs is reloading the weights from memory, under a millisecond even for DeiT-Small's 88 MB, so from
    20 ms a run it is within the noise of a median over the visit's runs; a whole DeiT-Small plan (80-350
    ms a run) keeps every run, which makes a build's whole-plan runs and a validation a third shorter. The
    rule is per runner, the same in a build's whole-plan runs, its entries, a validation and ``vitrim compare``.
    """
    per_visit = max(1, repeats // max(1, rounds))
    per_ref = max(1, per_visit // 2)  # the teacher is visited n times per round: fewer runs per visit
    samples: list[list[float]] = [[] for _ in runners]
    ratios: list[list[float]] = [[] for _ in runners]
    ref = runners[0]
    runs, cold = [], []
    for i, r in enumerate(runners):
        r._prepare(batch)
        warm = [r._run_once() for _ in range(max(1, warmup))]
        est = max(1e-3, float(np.median(warm)))
        base, want = (per_ref, 0.5 * min_visit_ms) if i == 0 else (per_visit, min_visit_ms)
        runs.append(max(base, int(np.ceil(want / est))))
        cold.append(est < DISCARD_BELOW_MS)

    def visit(i: int) -> list[float]:
        r = runners[i]
        if cold[i]:
            r._run_once()  # discarded: the first run after a switch pays for cold caches
        return [r._run_once() for _ in range(runs[i])]

    for _ in range(max(1, rounds)):
        before = visit(0)
        samples[0] += before
        for i, r in enumerate(runners[1:], start=1):
            got = visit(i)
            after = visit(0)
            samples[i] += got
            samples[0] += after
            ratios[i].append(float(np.median(got) / np.median(before + after)))
            before = after
    return [Timing.from_samples(s) for s in samples], ratios[1:]
