"""Torch targets (``torch-cpu``, ``torch-cuda``): a ``torch.export`` program.

The engine is a ``torch.export`` program saved as ``model.pt2`` on the target
device and dtype; it is loaded back from disk to run, so the parity gate never
compares the in-memory model with itself. Profiling times the eager module
(:class:`~vitrim.export.runners.TorchRunner`), to check the method on a GPU machine
without TensorRT.
"""
from __future__ import annotations

import os
from pathlib import Path

from vitrim.export.backends.base import BACKENDS, Backend, Engine, register
from vitrim.export.runners import Runner, TorchRunner
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_path


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
        self.cuda = device.startswith("cuda")
        self.name = "torch-cuda" if self.cuda else "torch-cpu"
        if self.cuda and not torch.cuda.is_available():
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


def build_torch_engine(model, out_path: str | os.PathLike, target, sample_shape: tuple[int, ...],
                       onnx_path=None) -> Engine:
    """Save a ``torch.export`` program of ``model`` on the target device and dtype (``model.pt2``).

    A torch target's engine is this saved program, loaded back from disk for the
    parity gate and timing, so the gate compares two independent objects.
    """
    import copy

    import torch

    device = BACKENDS[target.backend].device
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


class Torch(Backend):
    """Eager/exported torch on one device; registered once per device."""

    precisions = ("fp32", "fp16")
    quantized_precisions = ()
    from_model = True
    parallel_export = False  # nothing to export: the module is timed as it is

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        self.on_gpu = device == "cuda"
        self.align = 8 if self.on_gpu else 1

    def engine_version(self) -> str:
        import torch

        return f"torch {torch.__version__}"

    def check_available(self, target) -> None:
        if self.on_gpu:
            self.device_name()
        super().check_available(target)

    def engine_path(self, rd) -> Path:
        return rd.torch_program

    def build_engine(self, src, rd, target, sample_shape, model=None) -> Engine:
        if model is None:
            raise UserError("export", f"a {self.name} engine is built from the torch model", "pass the model")
        return build_torch_engine(model, rd.torch_program, target, sample_shape, src)

    def engine_runner(self, path, target) -> Runner:
        return TorchExportRunner(path, self.device, target.threads or None, half=target.precision == "fp16")

    def module_runner(self, model, onnx_path, workdir, name, target, sample_shape, reuse) -> Runner:
        return self.model_runner(model, sample_shape, target)

    def model_runner(self, model, sample_shape, target) -> Runner:
        return TorchRunner(model, sample_shape, self.device, target.threads, half=target.precision == "fp16")


register(Torch("torch-cpu", "cpu"))
register(Torch("torch-cuda", "cuda"))
