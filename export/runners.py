"""Backend runners behind one small interface (Polygraphy-style context managers).

Every runner loads a model, runs inference on numpy input, and times itself at
a batch with warm-up and repeats. Profiling (the LUT), engine measurement and
the parity gate all use these, so a latency in the LUT and a latency in the
manifest come from the same code.

* :class:`OrtCpuRunner` - ONNX Runtime CPU, fixed intra-op threads, sequential
  execution, fixed graph optimization level; can save the optimized model.
* :class:`TrtRunner` - TensorRT 10/11 engine via the tensorrt API with CUDA-event
  timing and an optional per-layer ``IProfiler`` report.
* :class:`TorchRunner` - eager PyTorch on CPU or CUDA (CUDA events on GPU), to
  check the method on a GPU machine without TensorRT.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from vitrim.pipeline.core.errors import UserError

_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


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


class OrtCpuRunner(Runner):
    """ONNX Runtime on the CPU execution provider."""

    name = "ort-cpu"

    def __init__(self, onnx_path: str | os.PathLike, threads: int = 2, opt_level: str = "all",
                 optimized_path: str | os.PathLike | None = None):
        self.onnx_path, self.threads, self.opt_level = str(onnx_path), threads, opt_level
        self.optimized_path = optimized_path
        self.sess = None
        self._feed = None

    def session_options(self):
        import onnxruntime as ort

        if self.opt_level not in _ORT_LEVELS:
            raise UserError("target", f"unknown ORT optimization level '{self.opt_level}'",
                            f"use one of {', '.join(_ORT_LEVELS)}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[self.opt_level])
        so.log_severity_level = 3
        # No spin-waiting: on a shared 2-core machine the spinning intra-op threads of one session
        # steal the cores of the next, and interleaved timings swing by +-30% (measured); with
        # spinning off, interleaved medians repeat within a few percent.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.optimized_path:
            so.optimized_model_filepath = str(self.optimized_path)
        return so

    def recorded_options(self) -> dict:
        return {"provider": "CPUExecutionProvider", "intra_op_num_threads": self.threads, "inter_op_num_threads": 1,
                "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": _ORT_LEVELS[self.opt_level],
                "session.intra_op.allow_spinning": "0"}

    def activate(self) -> None:
        import onnxruntime as ort

        if not Path(self.onnx_path).is_file():
            raise UserError("export", f"ONNX model '{self.onnx_path}' not found", "export it first (`vitrim export`)")
        try:
            self.sess = ort.InferenceSession(self.onnx_path, self.session_options(), providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for invalid graphs
            raise UserError("export", f"ONNX Runtime could not load '{self.onnx_path}' ({e})",
                            "re-export the model; the file may be corrupt") from None
        self.input_name = self.sess.get_inputs()[0].name
        self.output_name = self.sess.get_outputs()[0].name

    def deactivate(self) -> None:
        self.sess = None

    def sample_shape(self) -> tuple[int, ...]:
        shape = self.sess.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in shape):
            raise UserError("profile", f"'{self.onnx_path}' has symbolic non-batch dims {shape}", "export with a static sample shape")
        return tuple(shape)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def _prepare(self, batch: int, seed: int = 0) -> None:
        x = np.random.default_rng(seed).standard_normal((batch, *self.sample_shape()), dtype=np.float32)
        self._feed = {self.input_name: x}

    def _run_once(self) -> float:
        t = time.perf_counter()
        self.sess.run([self.output_name], self._feed)
        return (time.perf_counter() - t) * 1e3


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
        self.name = "torch-cuda" if device.startswith("cuda") else "torch-cpu"
        if self.name == "torch-cuda" and not torch.cuda.is_available():
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
        if self.threads and self.name == "torch-cpu":
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
            if self.name == "torch-cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.model(self._x)
                end.record()
                end.synchronize()
                return start.elapsed_time(end)
            t = time.perf_counter()
            self.model(self._x)
            return (time.perf_counter() - t) * 1e3


class TorchExportRunner(TorchRunner):
    """A saved ``torch.export`` program (``model.pt2``): the torch targets' engine artifact.

    Loaded from disk, so it is never the in-memory module the parity gate's
    reference wraps; it runs on the device and in the dtype it was exported with.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None, half: bool = False):
        import torch

        self.torch = torch
        self.path = str(path)
        self.device = device
        self.name = "torch-cuda" if device.startswith("cuda") else "torch-cpu"
        if self.name == "torch-cuda" and not torch.cuda.is_available():
            raise UserError("target", "torch-cuda target but no CUDA device is visible", "use torch-cpu or ort-cpu")
        if not Path(self.path).is_file():
            raise UserError("export", f"torch program '{self.path}' not found", "re-run `vitrim export`")
        try:
            self.model = torch.export.load(self.path).module()
        except Exception as e:  # corrupt archive, other torch version
            raise UserError("export", f"could not load the torch program '{self.path}' ({type(e).__name__}: {e})",
                            "re-export it with this torch version") from None
        self.half = half
        self._shape = None
        self.threads = threads

    def sample_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            ph = [n for n in self.model.graph.nodes if n.op == "placeholder"]
            val = ph[-1].meta.get("val") if ph else None
            if val is None:
                raise UserError("export", f"'{self.path}' does not record its input shape", "re-export it")
            self._shape = tuple(int(d) for d in val.shape[1:])
        return self._shape

    def _prepare(self, batch: int, seed: int = 0) -> None:
        g = self.torch.Generator().manual_seed(seed)
        x = self.torch.randn((batch, *self.sample_shape()), generator=g).to(self.device)
        self._x = x.half() if self.half else x


class TrtRunner(Runner):
    """A serialized TensorRT engine (TensorRT 10 or 11), run with ``execute_async_v3``.

    I/O lives in torch CUDA tensors whose addresses are bound with
    ``set_tensor_address``; timing uses CUDA events on the runner's stream. With
    ``layer_profile=True`` an ``IProfiler`` collects per-layer times (for reports
    only: Myelin fuses whole blocks, so the LUT uses block-level timing).
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike):
        self.engine_path = str(engine_path)
        self.layer_times: dict[str, list[float]] = {}

    def activate(self) -> None:
        import torch

        from vitrim.export.target import import_tensorrt

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise UserError("target", "TensorRT needs a CUDA device and none is visible", "run on a GPU machine")
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        data = Path(self.engine_path).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError("export", f"TensorRT could not deserialize '{self.engine_path}'",
                            "rebuild the engine on this GPU with this TensorRT version")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def deactivate(self) -> None:
        self.context = None
        self.engine = None

    def sample_shape(self) -> tuple[int, ...]:
        shape = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[1]  # (min, opt, max)
        return tuple(shape[1:])

    def _dtype(self, name: str):
        return {self.trt.float32: self.torch.float32, self.trt.float16: self.torch.float16,
                self.trt.int32: self.torch.int32}[self.engine.get_tensor_dtype(name)]

    def _bind(self, x) -> dict:
        torch = self.torch
        name = self.inputs[0]
        x = x.to(self._dtype(name)).contiguous()
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for o in self.outputs:
            shape = tuple(self.context.get_tensor_shape(o))
            outs[o] = torch.empty(shape, dtype=self._dtype(o), device="cuda")
            self.context.set_tensor_address(o, outs[o].data_ptr())
        self._keep = (x, outs)
        return outs

    def infer(self, x: np.ndarray) -> np.ndarray:
        t = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        outs = self._bind(t)
        self.stream.wait_stream(self.torch.cuda.current_stream())  # the input copy ran on the default stream
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return outs[self.outputs[0]].float().cpu().numpy()

    def _prepare(self, batch: int, seed: int = 0) -> None:
        g = self.torch.Generator().manual_seed(seed)
        self._bind(self.torch.randn((batch, *self.sample_shape()), generator=g).cuda())
        self.stream.wait_stream(self.torch.cuda.current_stream())

    def _run_once(self) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end)

    def layer_profile(self, batch: int, repeats: int = 10) -> dict[str, float]:
        """Median per-layer time (ms) through ``IProfiler``."""
        trt = self.trt
        times: dict[str, list[float]] = {}

        class _Profiler(trt.IProfiler):
            def __init__(self):
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name, ms):
                times.setdefault(layer_name, []).append(ms)

        self._prepare(batch)
        self.context.profiler = _Profiler()
        for _ in range(repeats):
            self.context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
        self.context.profiler = None
        return {k: float(np.median(v)) for k, v in times.items()}


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


def make_runner(backend: str, *, onnx_path=None, engine_path=None, model=None, sample_shape=None, threads: int = 2,
                opt_level: str = "all", precision: str = "fp32", optimized_path=None) -> Runner:
    """The runner for a backend name (``ort-cpu``, ``tensorrt``, ``torch-cpu``, ``torch-cuda``)."""
    if backend == "ort-cpu":
        return OrtCpuRunner(onnx_path, threads, opt_level, optimized_path)
    if backend == "tensorrt":
        return TrtRunner(engine_path)
    if backend in ("torch-cpu", "torch-cuda"):
        if model is None:
            raise UserError("target", f"{backend} needs the torch model", "pass model= to make_runner")
        return TorchRunner(model, sample_shape, "cuda" if backend == "torch-cuda" else "cpu", threads,
                           half=precision == "fp16")
    raise UserError("target", f"unknown backend '{backend}'", "use ort-cpu, tensorrt, torch-cpu or torch-cuda")
