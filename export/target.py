"""Targets and device signatures.

A :class:`Target` is what the user ships to: backend, precision, batch, threads.
Its :class:`DeviceSignature` adds what was detected on this machine (device name,
engine version) and the token count of the model. A latency table is keyed by a
signature and refuses to serve a different one.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Optional

from vitrim.pipeline.core.config import PRECISIONS, QuantConfig, TargetConfig
from vitrim.pipeline.core.errors import UserError, install_hint

BACKENDS = ("ort-cpu", "tensorrt", "torch-cpu", "torch-cuda")


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


def _cuda_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise UserError("target", "this target needs a CUDA GPU, and none is visible",
                        "run on a GPU machine, or use target.backend=ort-cpu")
    return torch.cuda.get_device_name(0)


def engine_version(backend: str) -> str:
    if backend == "ort-cpu":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    if backend == "tensorrt":
        trt = import_tensorrt()
        return f"tensorrt {trt.__version__}"
    import torch

    return f"torch {torch.__version__}"


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


@dataclass(frozen=True)
class DeviceSignature:
    """Everything a latency measurement depends on."""

    backend: str
    device: str
    engine_version: str
    precision: str
    batch: int
    tokens: int
    threads: int
    # engine options that change timing: ORT's graph optimization level, TensorRT's profile max batch
    opt_level: str = ""
    max_batch: int = 0
    quant: str = ""  # int8/fp8: how the graph is quantized (mode, calibration method, scales, op set)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceSignature":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            missing = sorted(names - set(d)) if isinstance(d, dict) else []
            why = f"it lacks {', '.join(missing)} (made by an older vitrim)" if missing else f"malformed: {d!r}"
            raise UserError("profile", f"the LUT's device signature is unusable: {why}",
                            "rebuild the LUT with `vitrim profile build CONFIG --rebuild`")
        return cls(**d)

    def key(self) -> str:
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.backend}-{self.precision}-b{self.batch}-t{self.tokens}-{h}"

    def diff(self, other: "DeviceSignature") -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def __str__(self) -> str:
        thr = f", {self.threads} threads" if self.threads else ""
        opt = f", opt level {self.opt_level}" if self.opt_level else ""
        mb = f", profile max batch {self.max_batch}" if self.max_batch else ""
        qt = f", quant {self.quant}" if self.quant else ""
        return (f"{self.backend}/{self.precision} on '{self.device}' ({self.engine_version}), "
                f"batch {self.batch}, {self.tokens} tokens{thr}{opt}{mb}{qt}")


@dataclass
class Target:
    backend: str = "ort-cpu"
    precision: str = "fp32"
    batch: int = 64
    threads: int = 2
    opt_level: str = "all"
    max_batch: Optional[int] = None
    quant: QuantConfig = field(default_factory=QuantConfig)

    @classmethod
    def from_config(cls, cfg: TargetConfig) -> "Target":
        if cfg.backend not in BACKENDS:
            raise UserError("target", f"unknown backend '{cfg.backend}'", f"use one of {', '.join(BACKENDS)}")
        return cls(cfg.backend, cfg.precision, cfg.batch, cfg.threads, cfg.opt_level, cfg.max_batch, cfg.quant)

    @property
    def quantized(self) -> bool:
        return self.precision in ("int8", "fp8")

    def quant_key(self) -> str:
        """The quantization settings that change timing (the calibration images do not)."""
        if not self.quantized:
            return ""
        q = self.quant
        if q.mode == "dynamic":
            return f"dynamic-{'pc' if q.per_channel else 'pt'}-{'+'.join(q.op_types)}{'-attn' if q.quantize_attention else ''}"
        att = "-attn" if q.quantize_attention else ""
        return f"static-{q.method}-{'pc' if q.per_channel else 'pt'}-{'+'.join(q.op_types)}{att}"

    @property
    def on_gpu(self) -> bool:
        return self.backend in ("tensorrt", "torch-cuda")

    def device_name(self) -> str:
        return _cuda_name() if self.on_gpu else cpu_name()

    def signature(self, tokens: int) -> DeviceSignature:
        if self.precision not in PRECISIONS.get(self.backend, ("fp32",)):
            raise UserError("target", f"{self.backend} does not offer {self.precision}",
                            f"use target.precision in {', '.join(PRECISIONS.get(self.backend, ('fp32',)))}")
        return DeviceSignature(self.backend, self.device_name(), engine_version(self.backend), self.precision,
                               self.batch, tokens, 0 if self.on_gpu else self.threads,
                               opt_level=self.opt_level if self.backend == "ort-cpu" else "",
                               max_batch=(self.max_batch or 2 * self.batch) if self.backend == "tensorrt" else 0,
                               quant=self.quant_key())

    def check_available(self) -> None:
        """Fail fast, before any training or measuring, when this machine cannot run the target."""
        if self.backend == "ort-cpu":
            import onnxruntime as ort

            if "CPUExecutionProvider" not in ort.get_available_providers():
                raise UserError("target", f"onnxruntime {ort.__version__} has no CPUExecutionProvider",
                                "pip install onnxruntime")
            if self.opt_level not in ("disable", "basic", "extended", "all"):
                raise UserError("target", f"target.opt_level '{self.opt_level}' is not an ORT level",
                                "use disable, basic, extended or all")
        elif self.backend == "tensorrt":
            import_tensorrt()
            _cuda_name()
        elif self.backend == "torch-cuda":
            _cuda_name()
        allowed = PRECISIONS.get(self.backend, ("fp32",))
        if self.precision not in allowed:
            raise UserError("target", f"{self.backend} does not offer {self.precision}",
                            f"use target.precision in {', '.join(allowed)}")
        if self.quantized and self.backend == "tensorrt":
            try:
                import modelopt.onnx.quantization  # noqa: F401
            except ImportError:
                raise UserError("target", f"a TensorRT {self.precision} engine is quantized with NVIDIA ModelOpt, "
                                "which is not installed", "pip install 'nvidia-modelopt[onnx]'") from None
        if self.max_batch is not None and self.max_batch < self.batch:
            raise UserError("target", f"target.max_batch={self.max_batch} is below target.batch={self.batch}",
                            "raise target.max_batch or leave it null (2x batch)")

    @property
    def align(self) -> int:
        """Channel alignment that keeps the target's fast kernels (8 for fp16 tensor cores)."""
        return 8 if self.on_gpu else 1


def check_compatible(lut_sig: DeviceSignature, want: DeviceSignature, what: str = "LUT") -> None:
    """Refuse, naming both signatures, when a table was measured elsewhere."""
    diff = lut_sig.diff(want)
    if diff:
        raise UserError("profile", f"the {what} was measured for [{lut_sig}] but the target is [{want}] "
                        f"(differs in: {', '.join(diff)})",
                        "rebuild it on this target with `vitrim profile build CONFIG`, or point profile.lut at a "
                        "table measured for this exact target")
