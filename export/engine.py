"""Engine build: the optimized artifact a target actually runs.

* ``ort-cpu``: ONNX Runtime's graph-optimized model saved to disk
  (``optimized_model_filepath``) with the session options recorded.
* ``tensorrt``: Polygraphy ``EngineBytesFromNetwork(NetworkFromOnnxPath(...))``
  with an optimization profile min/opt/max over batch, a timing cache and a
  saved ``.plan``. TensorRT 10: ``BuilderFlag.FP16`` (weak typing) for fp16.
  TensorRT 11 removed weak typing, so the network is strongly typed and fp16
  comes from an fp16 ONNX (:func:`vitrim.export.onnx.to_fp16`).
* ``torch-*``: a ``torch.export`` program saved as ``model.pt2`` on the target
  device and dtype; it is loaded back from disk to run, so the parity gate never
  compares the in-memory model with itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vitrim.export.runners import OrtCpuRunner, Runner, TrtRunner
from vitrim.export.target import Target, import_tensorrt, trt_major
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_path, atomic_write_bytes
from vitrim.pipeline.core.rundir import RunDir


@dataclass
class Engine:
    backend: str
    path: Optional[Path]  # the engine artifact (None for torch targets)
    onnx_path: Optional[Path]  # the ONNX the engine was built from (None for a torch program)
    options: dict = field(default_factory=dict)

    def runner(self, target: Target, model=None, sample_shape=None) -> Runner:
        if self.backend == "ort-cpu":
            return OrtCpuRunner(self.path, target.threads, "disable")  # already optimized offline
        if self.backend == "tensorrt":
            return TrtRunner(self.path)
        from vitrim.export.runners import TorchExportRunner

        return TorchExportRunner(self.path, "cuda" if self.backend == "torch-cuda" else "cpu", target.threads,
                                 half=target.precision == "fp16")


def build_ort_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, target: Target) -> Engine:
    """Save ORT's optimized graph for this CPU (level ``target.opt_level``)."""
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        runner = OrtCpuRunner(onnx_path, target.threads, target.opt_level, optimized_path=tmp)
        with runner:
            options = runner.recorded_options()
    return Engine("ort-cpu", out_path, Path(onnx_path), options)


def build_trt_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, target: Target,
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
    return Engine("tensorrt", out_path, Path(onnx_path),
                  {"tensorrt": trt.__version__, "precision": target.precision, "strongly_typed": major >= 11,
                   "profile": {"min": 1, "opt": target.batch, "max": max_batch},
                   "timing_cache": str(cache) if cache else None})


def _onnx_is_fp16(path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)


def build_torch_engine(model, out_path: str | os.PathLike, target: Target, sample_shape: tuple[int, ...],
                       onnx_path=None) -> Engine:
    """Save a ``torch.export`` program of ``model`` on the target device and dtype (``model.pt2``).

    A torch target's engine is this saved program, loaded back from disk for the
    parity gate and timing, so the gate compares two independent objects.
    """
    import copy

    import torch

    device = "cuda" if target.backend == "torch-cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("target", "torch-cuda target but no CUDA device is visible", "use torch-cpu or ort-cpu")
    half = target.precision == "fp16"
    m = copy.deepcopy(model).eval().to(device)
    if half:
        m = m.half()
    x = torch.randn(2, *sample_shape, device=device, dtype=torch.float16 if half else torch.float32)
    from vitrim.export.onnx import _forward_arg_name

    dyn = {_forward_arg_name(m): {0: torch.export.Dim("batch", min=1, max=4096)}}
    with torch.no_grad():
        program = torch.export.export(m, (x,), dynamic_shapes=dyn)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            torch.export.save(program, f)
    return Engine(target.backend, out_path, Path(onnx_path) if onnx_path else None,
                  {"format": "torch.export", "device": device, "dtype": "float16" if half else "float32",
                   "torch": torch.__version__})


def build_engine(onnx_path, out_dir, target: Target, sample_shape: tuple[int, ...], model=None) -> Engine:
    """Build the target's engine into ``out_dir``: from the ONNX file, or for torch targets from ``model``."""
    rd = RunDir(out_dir)
    if target.backend == "ort-cpu":
        return build_ort_engine(onnx_path, rd.ort_engine, target)
    if target.backend == "tensorrt":
        return build_trt_engine(onnx_path, rd.trt_engine, target, sample_shape, timing_cache=rd.trt_timing_cache)
    if model is None:
        raise UserError("export", f"a {target.backend} engine is built from the torch model", "pass the model")
    return build_torch_engine(model, rd.torch_program, target, sample_shape, onnx_path)


_EXPORT_CACHE: dict = {"dir": None, "paths": {}}
EXPORT_CACHE_MAX_BYTES = 16 << 20  # micro-models up to 16 MB of weights (a deit_small block); bigger ones re-export


def _module_key(model, sample_shape: tuple[int, ...]) -> Optional[str]:
    """A content key of a module for the export cache: every submodule's class and plain attributes
    (dims, scale, grid, ...), every tensor's bytes, the input shape. None: too big to cache."""
    import hashlib

    import torch

    tensors = list(model.state_dict(keep_vars=False).items()) + [(f"buffer:{n}", b) for n, b in model.named_buffers()]
    if sum(t.numel() * t.element_size() for _, t in tensors) > EXPORT_CACHE_MAX_BYTES:
        return None
    h = hashlib.sha256(repr(tuple(sample_shape)).encode())
    plain = (bool, int, float, str, tuple, list, dict, type(None))
    for name, m in model.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, plain))
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}:{attrs}".encode())
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_cached(model, path: Path, sample_shape: tuple[int, ...], reuse: bool = False) -> Path:
    """``export_onnx`` for profiling, reusing an identical module's export made earlier in this process
    (a LUT built again for another precision, the tests' several tiny LUTs, a repeated entry), and with
    ``reuse`` the file already at ``path`` (a resumed LUT build: written atomically, so whole)."""
    import atexit
    import shutil
    import tempfile

    from vitrim.export.onnx import export_onnx

    if reuse and Path(path).is_file():
        return Path(path)
    key = _module_key(model, sample_shape)
    hit = _EXPORT_CACHE["paths"].get(key) if key else None
    if hit is not None and hit.is_file():
        from vitrim.pipeline.core.io import atomic_save

        atomic_save(path, lambda tmp: shutil.copyfile(hit, tmp))  # whole or absent: a resumed build reuses it
        return path
    export_onnx(model, path, sample_shape)
    if key:
        if _EXPORT_CACHE["dir"] is None:
            _EXPORT_CACHE["dir"] = Path(tempfile.mkdtemp(prefix="vitrim-exports-"))
            atexit.register(shutil.rmtree, _EXPORT_CACHE["dir"], True)
        keep = _EXPORT_CACHE["dir"] / f"{key}.onnx"
        shutil.copyfile(path, keep)
        _EXPORT_CACHE["paths"][key] = keep
    return path


def runner_for_module(model, sample_shape: tuple[int, ...], target: Target, workdir, name: str,
                      reuse: bool = False) -> Runner:
    """Export ``model`` (and build its engine) for ``target``; return an (inactive) runner.

    The one path by which profiling times micro-models and whole plans, so both
    go through the exporter and engine builder a release uses.
    """
    from vitrim.export.onnx import to_fp16
    from vitrim.export.runners import make_runner

    if target.backend in ("torch-cpu", "torch-cuda"):
        return make_runner(target.backend, model=model, sample_shape=sample_shape, threads=target.threads,
                           precision=target.precision)
    workdir = Path(workdir)
    onnx_path = export_cached(model, workdir / f"{name}.onnx", sample_shape, reuse)
    if target.quantized:  # the table measures the quantized engine a release ships
        from vitrim.export.quantize import quantize_for_target, random_calibration

        q_path = workdir / f"{name}.{target.precision}.onnx"
        if not (reuse and q_path.is_file()):
            calib = None if target.quant.mode == "dynamic" else random_calibration(sample_shape, 8)
            quantize_for_target(onnx_path, q_path, target, calib)
        onnx_path = q_path
    if target.backend == "ort-cpu":
        return make_runner("ort-cpu", onnx_path=onnx_path, threads=target.threads, opt_level=target.opt_level)
    plan_path = workdir / f"{name}.plan"
    if reuse and plan_path.is_file():  # a resumed LUT build, or the sentinel of the next chunk: one engine
        return TrtRunner(plan_path)
    src = onnx_path
    if target.precision == "fp16" and trt_major() >= 11:  # strongly typed: fp16 comes from the ONNX
        src = to_fp16(onnx_path, workdir / f"{name}.fp16.onnx")
    eng = build_trt_engine(src, plan_path, target, sample_shape, RunDir(workdir).trt_timing_cache)
    return TrtRunner(eng.path)
