"""TensorRT (``tensorrt``): a serialized plan with a batch optimization profile.

Polygraphy ``EngineBytesFromNetwork(NetworkFromOnnxPath(...))`` with an optimization
profile min/opt/max over batch, a timing cache and a saved ``.plan``. TensorRT 10:
``BuilderFlag.FP16`` (weak typing) for fp16. TensorRT 11 removed weak typing, so the
network is strongly typed and fp16 comes from an fp16 ONNX
(:func:`vitrim.export.onnx.to_fp16`). int8/fp8 come from NVIDIA ModelOpt's QDQ ONNX.
The runner binds torch CUDA tensors and times with CUDA events; ``IProfiler`` gives
per-layer times for reports.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitrim.export.backends.base import Backend, Engine, TritonSpec, cuda_name, register
from vitrim.export.runners import Runner
from vitrim.pipeline.core.errors import UserError, install_hint
from vitrim.pipeline.core.io import atomic_write_bytes


def import_tensorrt():
    """Import TensorRT or say how to get it."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise UserError("target", "target.backend=tensorrt needs the tensorrt Python package",
                        install_hint("gpu") + " on a machine with an NVIDIA GPU; or use target.backend=ort-cpu") from None
    return trt


def trt_major() -> int:
    return int(import_tensorrt().__version__.split(".")[0])


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


def build_trt_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, target,
                     sample_shape: tuple[int, ...], timing_cache: str | os.PathLike | None = None) -> Engine:
    """Build and save a TensorRT plan with a batch optimization profile."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    major = trt_major()
    fp16 = target.precision == "fp16"
    # int8/fp8 come from the ONNX's Q/DQ nodes (explicit quantization); TensorRT 10 still needs the
    # builder flags to pick int8 kernels in a weakly typed network, TensorRT 11 is strongly typed.
    int8 = target.quantized and major < 11
    if fp16 and major >= 11 and not _onnx_is_fp16(onnx_path):
        raise UserError("export", f"TensorRT {trt.__version__} is strongly typed: fp16 needs an fp16 ONNX, "
                        f"and '{onnx_path}' is fp32", "export with target.precision=fp16 (vitrim converts the ONNX)")
    max_batch = target.max_batch or 2 * target.batch
    from vitrim.export.quantize import _input_name

    profile = Profile().add(_input_name(onnx_path), min=(1, *sample_shape), opt=(target.batch, *sample_shape),
                            max=(max_batch, *sample_shape))
    cache = Path(timing_cache) if timing_cache else None
    config = CreateConfig(fp16=True if ((fp16 or int8) and major < 11) else None, int8=True if int8 else None,
                          fp8=True if (target.precision == "fp8" and major < 11) else None, profiles=[profile],
                          load_timing_cache=str(cache) if cache and cache.is_file() else None,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True if major >= 11 else None)
    data = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache) if cache else None)()
    out_path = Path(out_path)
    atomic_write_bytes(out_path, bytes(data))
    return Engine(TensorRT.name, out_path, Path(onnx_path),
                  {"tensorrt": trt.__version__, "precision": target.precision, "strongly_typed": major >= 11,
                   "profile": {"min": 1, "opt": target.batch, "max": max_batch},
                   "timing_cache": str(cache) if cache else None})


def _onnx_is_fp16(path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)


class TensorRT(Backend):
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8", "fp8")
    libraries = ("tensorrt", "polygraphy", "nvidia-modelopt")
    quantized_precisions = ("int8", "fp8")
    quant_methods = ("minmax", "entropy")
    on_gpu = True
    align = 8  # fp16 tensor cores
    entry_chunk = 8
    triton = TritonSpec("platform", "tensorrt_plan", ("model.plan",), "KIND_GPU", served="engine")

    def engine_version(self) -> str:
        return f"tensorrt {import_tensorrt().__version__}"

    def check_available(self, target) -> None:
        import_tensorrt()
        cuda_name()
        super().check_available(target)
        if target.quantized:
            try:
                import modelopt.onnx.quantization  # noqa: F401
            except ImportError:
                raise UserError("target", f"a TensorRT {target.precision} engine is quantized with NVIDIA ModelOpt, "
                                "which is not installed", "pip install 'nvidia-modelopt[onnx]'") from None

    def signature_fields(self, target) -> dict:
        return {"threads": 0, "max_batch": target.max_batch or 2 * target.batch}

    def engine_path(self, rd) -> Path:
        return rd.trt_engine

    def graph_source(self, onnx_path, rd, target) -> Path:
        if target.precision == "fp16" and trt_major() >= 11:  # strongly typed: fp16 lives in the ONNX
            from vitrim.export.onnx import to_fp16

            return to_fp16(onnx_path, rd.engine_onnx("fp16"))
        return onnx_path

    def build_engine(self, src, rd, target, sample_shape, model=None) -> Engine:
        return build_trt_engine(src, rd.trt_engine, target, sample_shape, timing_cache=rd.trt_timing_cache)

    def engine_runner(self, path, target) -> Runner:
        return TrtRunner(path)

    def module_runner(self, model, onnx_path, workdir, name, target, sample_shape, reuse) -> Runner:
        from vitrim.export.onnx import to_fp16
        from vitrim.pipeline.core.rundir import RunDir

        plan_path = Path(workdir) / f"{name}.plan"
        if reuse and plan_path.is_file():  # a resumed LUT build, or the sentinel of the next chunk: one engine
            return TrtRunner(plan_path)
        src = onnx_path
        if target.precision == "fp16" and trt_major() >= 11:  # strongly typed: fp16 comes from the ONNX
            src = to_fp16(onnx_path, Path(workdir) / f"{name}.fp16.onnx")
        eng = build_trt_engine(src, plan_path, target, sample_shape, RunDir(workdir).trt_timing_cache)
        return TrtRunner(eng.path)

    def quantize(self, src, dst, target, calib) -> dict:
        from vitrim.export.quantize import quantize_modelopt

        return quantize_modelopt(src, dst, target.quant, calib, mode=target.precision)

    def triton_max_batch(self, sig: dict, max_batch, dynamic: bool) -> int:
        profile_max = int(sig.get("max_batch") or 0) or 2 * int(sig.get("batch") or 1)  # the plan's profile
        if max_batch is not None and max_batch > profile_max:
            raise UserError("triton", f"export.triton_max_batch={max_batch} exceeds the TensorRT plan's profile "
                            f"max batch {profile_max}", f"use at most {profile_max}, or re-export with a larger "
                            "target.max_batch")
        return max_batch or profile_max


register(TensorRT())
