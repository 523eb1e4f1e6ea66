"""The backend protocol and its registry.

A backend is one engine vitrim measures and ships to (ONNX Runtime on the CPU,
OpenVINO, TensorRT, eager/exported torch). Its class owns everything that differs
between engines: its names and precisions, the fail-fast availability check, the
device signature's engine fields, the engine build from ONNX and the artifact it
writes, the runners that time and run it, the quantizer of its reduced precisions,
the precision whose parity tolerances it is judged by, its Triton serving config,
and its export policy (parallel export, channel alignment). Code outside
``vitrim.export.backends`` asks the backend, never its name (Polygraphy's
``backend/<name>/`` folders; timm's ``@register_model``).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vitrim.pipeline.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from vitrim.export.runners import Runner

BACKENDS: dict[str, "Backend"] = {}


def register(backend: "Backend") -> "Backend":
    """Add a backend instance to :data:`BACKENDS` under its name."""
    if backend.name in BACKENDS:
        raise ValueError(f"backend '{backend.name}' registered twice")
    BACKENDS[backend.name] = backend
    return backend


def names() -> str:
    """The registered backend names, for help texts and error messages."""
    return ", ".join(BACKENDS)


def get_backend(name: str, stage: str = "target") -> "Backend":
    """The backend registered as ``name``, or a UserError naming the registered ones."""
    b = BACKENDS.get(name)
    if b is None:
        raise UserError(stage, f"unknown target.backend '{name}'", f"use one of {names()}")
    return b


@lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cuda_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise UserError("target", "this target needs a CUDA GPU, and none is visible",
                        "run on a GPU machine, or use a CPU backend (target.backend=ort-cpu or openvino)")
    return torch.cuda.get_device_name(0)


@dataclass
class Engine:
    """A built engine: its artifact, the ONNX it was built from, the options it was built with."""

    backend: str
    path: Optional[Path]  # the engine artifact (None for torch targets)
    onnx_path: Optional[Path]  # the ONNX the engine was built from (None for a torch program)
    options: dict = field(default_factory=dict)
    extra_files: dict = field(default_factory=dict)  # manifest key -> further files of the artifact (IR weights)

    def runner(self, target, model=None, sample_shape=None) -> "Runner":
        return BACKENDS[self.backend].engine_runner(self.path, target)

    def artifacts(self) -> dict:
        """The manifest entries of the engine's files."""
        out = {} if self.path is None else {"engine": self.path}
        out.update(self.extra_files)
        return out


@dataclass(frozen=True)
class TritonSpec:
    """How Triton serves a backend's release: the platform or backend field, the model file(s), the instance kind.

    ``served``: ``"graph"`` serves the ONNX graph the engine was built from (Triton's backend optimizes it with
    the recorded options), ``"engine"`` serves the engine artifact itself.
    """

    key: str  # "platform" or "backend"
    value: str
    files: tuple[str, ...]  # the file names Triton's backend loads by default, the first the model itself
    kind: str
    served: str


class Backend:
    """One engine. Subclasses set the class attributes and override what their engine does differently."""

    name: str = ""
    precisions: tuple[str, ...] = ("fp32",)
    quantized_precisions: tuple[str, ...] = ("int8",)  # precisions built from an explicitly quantized graph
    quant_modes: tuple[str, ...] = ("static",)  # target.quant.mode values it runs
    quant_methods: tuple[str, ...] = ("minmax",)
    on_gpu: bool = False
    align: int = 1  # channel alignment that keeps its fast kernels
    from_model: bool = False  # the engine is built from the torch model (not from an ONNX file)
    parallel_export: bool = True  # profiling may export micro-models ahead in worker processes
    times_onnx: bool = False  # a runner from an ONNX file times what the engine runs (one-session A/B of two graphs)
    entry_chunk: int = 12  # micro-models per timing run of a LUT build
    engine_is_graph: bool = False  # the engine is an ONNX graph onnxruntime runs (the model card's snippet runs it)
    triton: Optional[TritonSpec] = None
    libraries: tuple[str, ...] = ()  # the distributions of its engine, whose versions every manifest records

    # --- identity and availability ------------------------------------------------------------------------------
    def engine_version(self) -> str:
        raise NotImplementedError

    def device_name(self) -> str:
        return cuda_name() if self.on_gpu else cpu_name()

    def supported_precisions(self) -> tuple[str, ...]:
        """The precisions this machine can run (a subset of :attr:`precisions`; a CPU feature may be missing)."""
        return self.precisions

    def check_available(self, target) -> None:
        """Fail fast (UserError, exit 2) when this machine cannot run ``target``: what to install or what is missing."""
        if target.precision not in self.precisions:
            raise UserError("target", f"{self.name} does not offer {target.precision}",
                            f"use target.precision in {', '.join(self.precisions)}")
        if target.quantized and target.quant.mode not in self.quant_modes:
            raise UserError("target", f"target.quant.mode is {target.quant.mode}, which {self.name} does not run",
                            f"use target.quant.mode in {', '.join(self.quant_modes)}")
        if target.quantized and target.quant.mode == "static" and target.quant.method not in self.quant_methods:
            raise UserError("target", f"target.quant.method is {target.quant.method}, which {self.name} does not "
                            "calibrate with", f"use target.quant.method in {', '.join(self.quant_methods)}")
        if target.max_batch is not None and target.max_batch < target.batch:
            raise UserError("target", f"target.max_batch={target.max_batch} is below target.batch={target.batch}",
                            "raise target.max_batch or leave it null (2x batch)")

    def availability(self) -> Optional[str]:
        """None when this machine runs the backend at all, else why not (for ``vitrim targets``)."""
        try:
            self.engine_version()
            if self.on_gpu:
                cuda_name()
        except UserError as e:
            return f"{e.what} ({e.fix})" if e.fix else e.what
        return None

    def signature_fields(self, target) -> dict:
        """The DeviceSignature's engine-option fields (threads and whatever else changes timing)."""
        return {"threads": 0 if self.on_gpu else target.threads}

    def tolerance_precision(self, precision: str) -> str:
        """The precision whose parity tolerances (``Tolerances.for_precision``) judge this backend's ``precision``."""
        return "int8" if precision in self.quantized_precisions else precision

    # --- build, run, quantize -----------------------------------------------------------------------------------
    def engine_path(self, rd) -> Optional[Path]:
        """The engine artifact's path in a RunDir."""
        raise NotImplementedError

    def graph_source(self, onnx_path: Path, rd, target) -> Path:
        """The ONNX graph an unquantized engine is built from (TensorRT 11 fp16: an fp16 copy)."""
        return onnx_path

    def build_engine(self, src: Path, rd, target, sample_shape: tuple[int, ...], model=None) -> Engine:
        raise NotImplementedError

    def engine_runner(self, path: Path, target) -> "Runner":
        """A runner of a saved engine artifact."""
        raise NotImplementedError

    def onnx_runner(self, onnx_path: str | os.PathLike, target) -> "Runner":
        """A runner that builds the engine from ``onnx_path`` in memory (when :attr:`times_onnx`)."""
        raise NotImplementedError(f"{self.name} does not time an ONNX file directly")

    def timing_runner(self, src: Path, engine: Engine, target, model=None, sample_shape=None) -> "Runner":
        """The runner a release's latency is measured with (the LUT's runner code)."""
        return engine.runner(target, model, sample_shape)

    def module_runner(self, model, onnx_path: Path, workdir: Path, name: str, target,
                      sample_shape: tuple[int, ...], reuse: bool) -> "Runner":
        """A profiling runner of a micro-model or plan exported to ``onnx_path`` (quantized already when asked)."""
        return self.onnx_runner(onnx_path, target)

    def quantized_name(self, name: str, precision: str) -> str:
        """The file name of a profiling micro-model's quantized graph (a release's is ``RunDir.engine_onnx``)."""
        return f"{name}.{precision}.onnx"

    def quantize(self, src, dst, target, calib) -> dict:
        """Write the explicitly quantized graph of ``src`` to ``dst``; return what the manifest records."""
        raise UserError("target", f"{target.precision} is not offered for {self.name}",
                        f"use target.precision in {', '.join(self.precisions)}")

    def quant_key(self, target) -> str:
        """The quantization settings that change timing (the calibration images do not)."""
        q = target.quant
        if q.mode == "dynamic":
            return f"dynamic-{'pc' if q.per_channel else 'pt'}-{'+'.join(q.op_types)}{'-attn' if q.quantize_attention else ''}"
        att = "-attn" if q.quantize_attention else ""
        return f"static-{q.method}-{'pc' if q.per_channel else 'pt'}-{'+'.join(q.op_types)}{att}"

    def second_reference(self, onnx_path: Path, target) -> Optional["Runner"]:
        """A reduced-precision release's informational second reference (the fp32 engine), or None."""
        return None

    def quantized_path(self, rd, precision: str) -> Path:
        """Where a release writes the quantized graph its engine is built from."""
        return rd.engine_onnx(precision)

    def quantized_artifacts(self, path: Path, precision: str) -> dict:
        """The manifest entries of that quantized graph."""
        return {f"onnx_{precision}": path}

    # --- serving ------------------------------------------------------------------------------------------------
    def triton_fields(self, sig: dict) -> dict:
        """Further ``config.pbtxt`` fields: run as measured (threads, precision, optimization)."""
        return {}

    def triton_max_batch(self, sig: dict, max_batch: Optional[int], dynamic: bool) -> int:
        timed = int(sig.get("batch") or 1)
        if dynamic:
            return max_batch or timed
        return 0  # a static batch: Triton passes whole tensors, batch dim included

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
