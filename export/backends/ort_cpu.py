"""ONNX Runtime on the CPU execution provider (``ort-cpu``).

The engine is ORT's graph-optimized model saved to disk (``optimized_model_filepath``)
with the session options recorded; int8 comes from ``onnxruntime.quantization``
(static QDQ calibrated on training images, or dynamic). Sessions run with fixed
intra-op threads, sequential execution, a fixed graph optimization level and no
spin-waiting.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from vitrim.export.backends.base import Backend, Engine, TritonSpec, register
from vitrim.export.runners import Runner
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_path

_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
# the Triton ORT backend's optimization { graph { level } }: -1 basic, 1 extended, 2 disabled, absent: all
ORT_GRAPH_LEVELS = {"basic": -1, "extended": 1, "disable": 2}


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


def build_ort_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, target) -> Engine:
    """Save ORT's optimized graph for this CPU (level ``target.opt_level``)."""
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        runner = OrtCpuRunner(onnx_path, target.threads, target.opt_level, optimized_path=tmp)
        with runner:
            options = runner.recorded_options()
    return Engine(OrtCpu.name, out_path, Path(onnx_path), options)


class OrtCpu(Backend):
    name = "ort-cpu"
    precisions = ("fp32", "int8")
    libraries = ("onnxruntime",)
    quant_modes = ("static", "dynamic")
    quant_methods = ("minmax", "entropy", "percentile")
    times_onnx = True
    engine_is_graph = True
    triton = TritonSpec("platform", "onnxruntime_onnx", ("model.onnx",), "KIND_CPU", served="graph")

    def engine_version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def check_available(self, target) -> None:
        import onnxruntime as ort

        if "CPUExecutionProvider" not in ort.get_available_providers():
            raise UserError("target", f"onnxruntime {ort.__version__} has no CPUExecutionProvider",
                            "pip install onnxruntime")
        if target.opt_level not in _ORT_LEVELS:
            raise UserError("target", f"target.opt_level '{target.opt_level}' is not an ORT level",
                            "use disable, basic, extended or all")
        super().check_available(target)

    def signature_fields(self, target) -> dict:
        return {"threads": target.threads, "opt_level": target.opt_level}

    def engine_path(self, rd) -> Path:
        return rd.ort_engine

    def build_engine(self, src, rd, target, sample_shape, model=None) -> Engine:
        return build_ort_engine(src, rd.ort_engine, target)

    def engine_runner(self, path, target) -> Runner:
        return OrtCpuRunner(path, target.threads, "disable")  # already optimized offline

    def onnx_runner(self, onnx_path, target) -> Runner:
        return OrtCpuRunner(onnx_path, target.threads, target.opt_level)

    def timing_runner(self, src, engine, target, model=None, sample_shape=None) -> Runner:
        return self.onnx_runner(src, target)  # as the LUT timed it: optimized at session start

    def quantize(self, src, dst, target, calib) -> dict:
        from vitrim.export.quantize import quantize_ort

        return quantize_ort(src, dst, target.quant, calib)

    def second_reference(self, onnx_path, target) -> Optional[Runner]:
        return OrtCpuRunner(onnx_path, target.threads, target.opt_level)

    def triton_fields(self, sig: dict) -> dict:
        cfg: dict = {}
        level = ORT_GRAPH_LEVELS.get(sig.get("opt_level") or "all")
        if level is not None:
            cfg["optimization"] = {"graph": {"level": level}}
        cfg["parameters"] = {"intra_op_thread_count": str(sig.get("threads") or 0), "inter_op_thread_count": "1",
                             "execution_mode": "0"}  # sequential
        return cfg


register(OrtCpu())
