"""OpenVINO on the CPU (``openvino``): an IR compiled with its timing options pinned.

The engine is the ONNX read by ``openvino`` and saved as an IR (``ov.save_model``,
weights kept in fp32). It is compiled with every option that changes numerics or
timing set explicitly, and the same options go into the device signature:

* ``INFERENCE_PRECISION_HINT``: f32 for fp32 and int8 (the layers NNCF leaves in
  float), bf16 for bf16. OpenVINO computes in bf16 by default on CPUs with
  avx512_bf16 or AMX, so an fp32 target that left it unset would ship bf16 numerics.
* ``INFERENCE_NUM_THREADS`` = ``target.threads``, ``NUM_STREAMS`` = 1 and
  ``PERFORMANCE_HINT`` = LATENCY: one request at a time, as the LUT times it.

int8 comes from NNCF post-training quantization (``nncf.quantize`` with
``model_type=TRANSFORMER``, which keeps softmax, LayerNorm and the attention's
activation products in float and applies SmoothQuant) on calibration images; its
result is an IR with FakeQuantize nodes (``model.int8.xml``) that the engine is built from.
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

STREAMS = 1
HINT = "LATENCY"
# target.precision -> OpenVINO's inference precision (the float layers of an int8 graph run in f32)
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def import_openvino():
    """Import OpenVINO or say how to get it."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("target", "target.backend=openvino needs the openvino Python package",
                        "pip install openvino (a default dependency of vitrim: reinstall it)") from None
    return ov


def compile_config(threads: int, inference_precision: Optional[str]) -> dict:
    """The ``compile_model`` properties; ``inference_precision`` None leaves OpenVINO's default (bf16 where the
    CPU has it): only a test that shows why it is pinned passes None."""
    cfg = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": STREAMS, "PERFORMANCE_HINT": HINT}
    if inference_precision is not None:
        cfg["INFERENCE_PRECISION_HINT"] = inference_precision
    return cfg


class OpenVinoRunner(Runner):
    """An ONNX file or IR compiled for the CPU with pinned threads, streams, hint and inference precision."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int = 2, inference_precision: Optional[str] = "f32"):
        self.path, self.threads, self.inference_precision = str(path), threads, inference_precision
        self.compiled = None
        self._request = None
        self._x = None

    def activate(self) -> None:
        ov = import_openvino()
        if not Path(self.path).is_file():
            raise UserError("export", f"model '{self.path}' not found", "export it first (`vitrim export`)")
        core = ov.Core()
        try:
            model = core.read_model(self.path)
            self.compiled = core.compile_model(model, "CPU", compile_config(self.threads, self.inference_precision))
        except Exception as e:  # OpenVINO raises RuntimeError for unreadable or unsupported graphs
            raise UserError("export", f"OpenVINO could not load '{self.path}' ({str(e).splitlines()[0][:300]})",
                            "re-export the model; the file may be corrupt") from None
        self._request = self.compiled.create_infer_request()

    def deactivate(self) -> None:
        self._request = None
        self.compiled = None

    def recorded_options(self) -> dict:
        """The compile options as OpenVINO reports them back (what the engine actually runs with)."""
        c = self.compiled
        return {"device": "CPU", **{k: str(c.get_property(k)) for k in
                                    ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT",
                                     "INFERENCE_PRECISION_HINT")}}

    def sample_shape(self) -> tuple[int, ...]:
        shape = self.compiled.input(0).get_partial_shape()
        dims = shape[1:] if shape.rank.is_static else None
        if dims is None or not all(d.is_static for d in dims):
            raise UserError("profile", f"'{self.path}' has dynamic non-batch dims {shape}",
                            "export with a static sample shape")
        return tuple(int(d.get_length()) for d in dims)

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self._request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(out[self.compiled.output(0)], dtype=np.float32)

    def _prepare(self, batch: int, seed: int = 0) -> None:
        ov = import_openvino()
        self._x = np.random.default_rng(seed).standard_normal((batch, *self.sample_shape()), dtype=np.float32)
        self._request.set_input_tensor(0, ov.Tensor(self._x))  # bound once, as a served request's input is
        self._request.infer()  # the first run at a new shape compiles its kernels

    def _run_once(self) -> float:
        t = time.perf_counter()
        self._request.infer()
        return (time.perf_counter() - t) * 1e3


def save_ir(model, path: str | os.PathLike) -> Path:
    """``ov.save_model`` to ``path`` (``.xml``) and its ``.bin`` beside it, each written atomically, weights in
    fp32 (``save_model`` would halve them by default). Returns the weights' path."""
    ov = import_openvino()
    path = Path(path)
    weights = path.with_suffix(".bin")
    with atomic_path(weights) as tmp_bin, atomic_path(path) as tmp_xml:
        xml = Path(tmp_xml).with_suffix(".xml")  # the IR finds its weights by its own stem
        try:
            ov.save_model(model, str(xml), compress_to_fp16=False)
            os.replace(xml.with_suffix(".bin"), tmp_bin)
            os.replace(xml, tmp_xml)
        finally:
            xml.unlink(missing_ok=True)
            xml.with_suffix(".bin").unlink(missing_ok=True)
    return weights


def build_openvino_engine(src: str | os.PathLike, out_path: str | os.PathLike, target) -> Engine:
    """Read ``src`` (ONNX or IR), compile it once with the target's options (a graph OpenVINO cannot run fails
    here), and save it as an IR at ``out_path`` (``.xml`` plus ``.bin``, weights in fp32)."""
    ov = import_openvino()
    out_path = Path(out_path)
    runner = OpenVinoRunner(src, target.threads, INFERENCE_PRECISION[target.precision])
    with runner:
        options = runner.recorded_options()
    model = ov.Core().read_model(str(src))
    weights = save_ir(model, out_path)
    return Engine(OpenVino.name, out_path, Path(src), {"openvino": ov.__version__, **options},
                  extra_files={"engine_weights": weights})


def quantize_nncf(src: str | os.PathLike, dst: str | os.PathLike, calib: np.ndarray, batch: int = 8) -> dict:
    """NNCF post-training int8 quantization (``model_type=TRANSFORMER``) of the ONNX ``src``, calibrated on
    ``calib``; the quantized IR goes to ``dst`` (``.xml`` and ``.bin``)."""
    ov = import_openvino()
    try:
        import nncf
    except ImportError:
        raise UserError("export", "an OpenVINO int8 engine is quantized with NNCF, which is not installed",
                        "pip install nncf (a default dependency of vitrim: reinstall it)") from None
    import logging

    from vitrim.export.quantize import calibration_hash

    if calib is None or len(calib) == 0:
        raise UserError("export", "NNCF's int8 quantization needs calibration images", "pass calibration images")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = ov.Core().read_model(str(src))
    batches = [np.ascontiguousarray(calib[i:i + batch], dtype=np.float32) for i in range(0, len(calib), batch)]
    q = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(batches), preset=nncf.QuantizationPreset.PERFORMANCE)
    save_ir(q, dst)
    return {"tool": "nncf.quantize", "nncf": nncf.__version__, "model_type": "TRANSFORMER", "preset": "PERFORMANCE",
            "calib_images": int(len(calib)), "calib_sha256": calibration_hash(calib)}


class OpenVino(Backend):
    name = "openvino"
    precisions = ("fp32", "bf16", "int8")
    libraries = ("openvino", "nncf")
    quant_methods = ("minmax",)
    times_onnx = True
    triton = TritonSpec("backend", "openvino", ("model.xml", "model.bin"), "KIND_CPU", served="engine")

    def engine_version(self) -> str:
        return f"openvino {import_openvino().__version__}"

    def has_bf16(self) -> bool:
        """Whether this CPU computes bf16 natively (OpenVINO reports it, and the CPU flags say which unit)."""
        ov = import_openvino()
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")

    def supported_precisions(self) -> tuple[str, ...]:
        return tuple(p for p in self.precisions if p != "bf16" or self.has_bf16())

    def check_available(self, target) -> None:
        ov = import_openvino()
        if "CPU" not in ov.Core().available_devices:
            raise UserError("target", f"openvino {ov.__version__} sees no CPU device", "reinstall openvino")
        super().check_available(target)
        if target.precision == "bf16" and not self.has_bf16():
            raise UserError("target", f"OpenVINO bf16 needs a CPU with {' or '.join(BF16_FLAGS)}, and this one "
                            f"('{self.device_name()}') has neither", "use target.precision=fp32 or int8 here")
        if target.quantized:
            try:
                import nncf  # noqa: F401
            except ImportError:
                raise UserError("target", "an OpenVINO int8 engine is quantized with NNCF, which is not installed",
                                "pip install nncf") from None

    def signature_fields(self, target) -> dict:
        return {"threads": target.threads,
                "options": f"streams={STREAMS},hint={HINT},inference_precision={INFERENCE_PRECISION[target.precision]}"}

    def quant_key(self, target) -> str:
        return "nncf-ptq-transformer-performance"

    def engine_path(self, rd) -> Path:
        return rd.ov_engine

    def build_engine(self, src, rd, target, sample_shape, model=None) -> Engine:
        return build_openvino_engine(src, rd.ov_engine, target)

    def engine_runner(self, path, target) -> Runner:
        return OpenVinoRunner(path, target.threads, INFERENCE_PRECISION[target.precision])

    def onnx_runner(self, onnx_path, target) -> Runner:
        return OpenVinoRunner(onnx_path, target.threads, INFERENCE_PRECISION[target.precision])

    def quantized_name(self, name: str, precision: str) -> str:
        return f"{name}.{precision}.xml"

    def quantized_path(self, rd, precision: str) -> Path:
        return rd.ov_graph(precision)

    def quantized_artifacts(self, path: Path, precision: str) -> dict:
        return {f"ir_{precision}": path, f"ir_{precision}_weights": path.with_suffix(".bin")}

    def quantize(self, src, dst, target, calib) -> dict:
        return quantize_nncf(src, dst, calib)

    def second_reference(self, onnx_path, target) -> Optional[Runner]:
        if target.precision == "fp32":
            return None
        return OpenVinoRunner(onnx_path, target.threads, "f32")  # the fp32 engine, for the report

    def triton_fields(self, sig: dict) -> dict:
        opts = dict(kv.split("=", 1) for kv in (sig.get("options") or "").split(",") if "=" in kv)
        return {"parameters": {"INFERENCE_NUM_THREADS": str(sig.get("threads") or 0),
                               "NUM_STREAMS": opts.get("streams", str(STREAMS)),
                               "PERFORMANCE_HINT": opts.get("hint", HINT),
                               "INFERENCE_PRECISION_HINT": opts.get("inference_precision", "f32")}}


register(OpenVino())
