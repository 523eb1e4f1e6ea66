"""Engine build: the optimized artifact a target actually runs.

Each backend builds its own engine (:mod:`vitrim.export.backends`: ORT's optimized
graph, an OpenVINO IR, a TensorRT plan, a ``torch.export`` program); here are the
entry point that asks the target's backend, and the one path by which profiling
exports a module and opens a runner of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vitrim.export.backends import Engine
from vitrim.export.runners import Runner
from vitrim.export.target import Target
from vitrim.pipeline.core.rundir import RunDir


def build_engine(onnx_path, out_dir, target: Target, sample_shape: tuple[int, ...], model=None) -> Engine:
    """Build the target's engine into ``out_dir``: from the ONNX file, or for torch targets from ``model``."""
    return target.impl.build_engine(Path(onnx_path) if onnx_path else None, RunDir(out_dir), target,
                                    tuple(sample_shape), model)


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
    backend = target.impl
    if backend.from_model:
        return backend.model_runner(model, sample_shape, target)
    workdir = Path(workdir)
    onnx_path = export_cached(model, workdir / f"{name}.onnx", sample_shape, reuse)
    if target.quantized:  # the table measures the quantized engine a release ships
        from vitrim.export.quantize import random_calibration

        q_path = workdir / backend.quantized_name(name, target.precision)
        if not (reuse and q_path.is_file()):
            calib = None if target.quant.mode == "dynamic" else random_calibration(sample_shape, 8)
            backend.quantize(onnx_path, q_path, target, calib)
        onnx_path = q_path
    return backend.module_runner(model, onnx_path, workdir, name, target, tuple(sample_shape), reuse)
