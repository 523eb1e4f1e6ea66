"""Targets and device signatures.

A :class:`Target` is what the user ships to: backend, precision, batch, threads.
Its :class:`DeviceSignature` adds what was detected on this machine (device name,
engine version) and the token count of the model. A latency table is keyed by a
signature and refuses to serve a different one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from vitrim.export.backends import BACKENDS, Backend, cpu_flags, cpu_name, get_backend
from vitrim.pipeline.core.config import QuantConfig, TargetConfig
from vitrim.pipeline.core.errors import UserError


def engine_version(backend: str) -> str:
    """The engine's name and version as the signature records it (``onnxruntime 1.22.0``)."""
    return get_backend(backend).engine_version()


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
    # further engine options that change timing, as ``key=value`` pairs (OpenVINO: streams, performance hint,
    # inference precision); left out of to_dict() when empty, so the other backends' signatures and keys are as before
    options: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["options"]:
            d.pop("options")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceSignature":
        names = {f.name for f in fields(cls)}
        if isinstance(d, dict) and "options" not in d:
            d = {**d, "options": ""}
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
        op = f", {self.options}" if self.options else ""
        tok = f", {self.tokens} tokens" if self.tokens else ""  # 0: not keyed by a token count (timing whole graphs)
        return (f"{self.backend}/{self.precision} on '{self.device}' ({self.engine_version}), "
                f"batch {self.batch}{tok}{thr}{opt}{mb}{qt}{op}")


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
        get_backend(cfg.backend)
        return cls(cfg.backend, cfg.precision, cfg.batch, cfg.threads, cfg.opt_level, cfg.max_batch, cfg.quant)

    @property
    def impl(self) -> Backend:
        """The registered backend that builds, runs and quantizes this target's engine."""
        return get_backend(self.backend)

    @property
    def quantized(self) -> bool:
        return self.precision in self.impl.quantized_precisions

    def quant_key(self) -> str:
        """The quantization settings that change timing (the calibration images do not)."""
        return self.impl.quant_key(self) if self.quantized else ""

    @property
    def on_gpu(self) -> bool:
        return self.impl.on_gpu

    def device_name(self) -> str:
        return self.impl.device_name()

    def signature(self, tokens: int) -> DeviceSignature:
        b = self.impl
        if self.precision not in b.precisions:
            raise UserError("target", f"{self.backend} does not offer {self.precision}",
                            f"use target.precision in {', '.join(b.precisions)}")
        return DeviceSignature(self.backend, self.device_name(), b.engine_version(), self.precision,
                               self.batch, tokens, quant=self.quant_key(), **b.signature_fields(self))

    def check_available(self) -> None:
        """Fail fast, before any training or measuring, when this machine cannot run the target."""
        self.impl.check_available(self)

    @property
    def align(self) -> int:
        """Channel alignment that keeps the target's fast kernels (8 for fp16 tensor cores)."""
        return self.impl.align


def check_compatible(lut_sig: DeviceSignature, want: DeviceSignature, what: str = "LUT") -> None:
    """Refuse, naming both signatures, when a table was measured elsewhere."""
    diff = lut_sig.diff(want)
    if diff:
        raise UserError("profile", f"the {what} was measured for [{lut_sig}] but the target is [{want}] "
                        f"(differs in: {', '.join(diff)})",
                        "rebuild it on this target with `vitrim profile build CONFIG`, or point profile.lut at a "
                        "table measured for this exact target")


CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine_targets() -> dict:
    """What this machine can run: the CPU and its features that matter to the engines' kernels (int8 dot
    products: avx512_vnni; bf16: avx512_bf16 or AMX), the GPU if any, and per backend its engine version and
    runnable precisions, or why it is unavailable (``vitrim targets``)."""
    import torch

    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows = []
    for name, b in BACKENDS.items():
        why = b.availability()
        row = {"backend": name, "available": why is None, "why": why, "engine_version": None, "precisions": [],
               "offers": list(b.precisions), "device": None}
        if why is None:
            row["engine_version"] = b.engine_version()
            row["precisions"] = list(b.supported_precisions())
            row["device"] = b.device_name()
        rows.append(row)
    return {"cpu": cpu_name(), "cpu_features": {f: f in flags for f in CPU_FEATURES}, "gpu": gpu, "backends": rows}


def format_targets(info: dict) -> str:
    """:func:`machine_targets` as the text ``vitrim targets`` prints."""
    feats = " ".join(f"{f}{'+' if on else '-'}" for f, on in info["cpu_features"].items())
    w = max(len("engine"), *(len(r["engine_version"] or "-") for r in info["backends"]))
    lines = [f"CPU: {info['cpu']}", f"  features: {feats}", f"GPU: {info['gpu'] or 'none visible'}", "",
             f"{'backend':<11} {'engine':<{w}} {'precisions here':<20} not here / why"]
    for r in info["backends"]:
        if r["available"]:
            missing = [p for p in r["offers"] if p not in r["precisions"]]
            lines.append(f"{r['backend']:<11} {r['engine_version']:<{w}} {', '.join(r['precisions']):<20} "
                         f"{', '.join(missing)}".rstrip())
        else:
            lines.append(f"{r['backend']:<11} {'-':<{w}} {'-':<20} {r['why']}")
    return "\n".join(lines)
