"""INT8 (and FP8) ONNX: explicit Q/DQ quantization for the engines that run it.

* ONNX Runtime (CPU): ``onnxruntime.quantization``. ``static`` inserts QDQ pairs
  calibrated on real training images (MinMax, Entropy or Percentile), with
  per-channel weights and a configurable op set; ``dynamic`` quantizes the
  weights and computes activation scales at run time (no calibration).
* OpenVINO: NNCF (:mod:`vitrim.export.backends.openvino`).
* TensorRT: NVIDIA ModelOpt's ``modelopt.onnx.quantization.quantize`` writes a QDQ
  ONNX that follows TensorRT's explicit-quantization rules (TensorRT 11 has no
  implicit INT8: precision lives in the graph).

The same functions quantize the LUT's micro-models (calibrated on random
activations of unit scale: what a LayerNorm feeds a block), so the latency table
measures the int8 engine a release ships. :func:`calibration_hash` goes into the
manifest, so a release records exactly which images set its scales.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from vitrim.export.onnx import onnx_io, strip_value_info
from vitrim.pipeline.core.config import QuantConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_path

_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def collect_calibration(batches: Iterable, n_images: int) -> np.ndarray:
    """The first ``n_images`` images of an ``(images, labels)`` (or images) stream, as float32."""
    out, n = [], 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        out.append(np.ascontiguousarray(x[: n_images - n], dtype=np.float32))
        n += len(out[-1])
        if n >= n_images:
            break
    if n == 0:
        raise UserError("export", "int8 calibration got no images", "check the training split and target.quant.calib_images")
    return np.concatenate(out)


def calibration_hash(calib: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(calib, dtype=np.float32).tobytes()).hexdigest()


def random_calibration(sample_shape: tuple[int, ...], n: int = 16, seed: int = 0) -> np.ndarray:
    """Unit-scale random activations: the calibration of LUT micro-models (only their timing matters)."""
    return np.random.default_rng(seed).standard_normal((n, *sample_shape), dtype=np.float32)


def _input_name(path) -> str:
    return onnx_io(path)[0][0]


class _Reader:
    """ORT's ``CalibrationDataReader`` protocol over an array, in small batches."""

    def __init__(self, name: str, calib: np.ndarray, batch: int = 16):
        self.name, self.calib, self.batch, self.i = name, calib, batch, 0

    def get_next(self):
        if self.i >= len(self.calib):
            return None
        x = self.calib[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.name: x}

    def rewind(self):
        self.i = 0


def activation_matmuls(path) -> list[str]:
    """MatMul nodes whose inputs are both activations (attention's QK^T and AV)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consts = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def quantize_ort(src: str | os.PathLike, dst: str | os.PathLike, q: QuantConfig,
                 calib: Optional[np.ndarray] = None) -> dict:
    """ORT int8: static QDQ (calibrated on ``calib``) or dynamic. Returns the settings for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    import logging

    dst = Path(dst)
    import onnxruntime

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # ORT's "consider pre-processing"
    onnxruntime.set_default_logger_severity(3)  # the calibrator's sessions warn about every unused initializer
    info = {"tool": "onnxruntime.quantization", "mode": q.mode, "per_channel": q.per_channel,
            "op_types": list(q.op_types), "reduce_range": q.reduce_range, "quantize_attention": q.quantize_attention}
    with atomic_path(dst) as tmp:
        clean = tmp.with_name(tmp.name + ".src.onnx")
        try:
            import shutil

            shutil.copyfile(src, clean)
            strip_value_info(clean)
            # attention's activation x activation matmuls stay in float unless asked for: their int8 error
            # is what costs top-1 (the same default as ModelOpt's MHA handling), and they hold no weights
            exclude = [] if q.quantize_attention else activation_matmuls(clean)
            info["excluded_nodes"] = len(exclude)
            if q.mode == "dynamic":
                quantize_dynamic(str(clean), str(tmp), op_types_to_quantize=list(q.op_types), per_channel=q.per_channel,
                                 reduce_range=q.reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
            else:
                if calib is None:
                    raise UserError("export", "static int8 needs calibration images", "pass calibration data")
                method = getattr(CalibrationMethod, _ORT_METHODS[q.method])
                quantize_static(str(clean), str(tmp), _Reader(_input_name(clean), calib), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(q.op_types), per_channel=q.per_channel,
                                reduce_range=q.reduce_range, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude,
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
                info.update(method=q.method, calib_images=int(len(calib)), calib_sha256=calibration_hash(calib))
        finally:
            for f in clean.parent.glob(clean.name + "*"):
                f.unlink(missing_ok=True)
            for f in Path(tmp).parent.glob("augmented_model*.onnx"):  # ORT's calibration scratch files
                f.unlink(missing_ok=True)
    return info


def quantize_modelopt(src: str | os.PathLike, dst: str | os.PathLike, q: QuantConfig, calib: np.ndarray,
                      mode: str = "int8") -> dict:
    """TensorRT's explicit quantization through NVIDIA ModelOpt (``pip install nvidia-modelopt[onnx]``)."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise UserError("export", f"a {mode} TensorRT engine needs NVIDIA ModelOpt's ONNX quantization",
                        "pip install 'nvidia-modelopt[onnx]' (the 'gpu' extra), or use target.precision=fp16") from None
    dst = Path(dst)
    method = {"minmax": "max", "entropy": "entropy"}.get(q.method)
    if method is None:
        raise UserError("export", f"ModelOpt calibrates with max or entropy, not '{q.method}'",
                        "set target.quant.method to minmax or entropy")
    with atomic_path(dst) as tmp:
        out = tmp.with_suffix(".onnx")
        # explicit: calibrate on the CPU provider (no ORT-GPU needed), and the float ops between Q/DQ pairs in
        # fp16 (ModelOpt's default, recorded in the manifest because it changes the engine's numerics)
        quantize(str(src), quantize_mode=mode, calibration_data={_input_name(src): calib}, calibration_method=method,
                 calibration_eps=["cpu"], high_precision_dtype="fp16", op_types_to_quantize=list(q.op_types) or None,
                 output_path=str(out))
        os.replace(out, tmp)
    return {"tool": "modelopt.onnx.quantization", "mode": mode, "method": method, "high_precision_dtype": "fp16",
            "calib_images": int(len(calib)),
            "calib_sha256": calibration_hash(calib)}


def quantize_for_target(src, dst, target, calib: Optional[np.ndarray]) -> dict:
    """The quantized graph a target's engine is built from (its backend's quantizer)."""
    return target.impl.quantize(src, dst, target, calib)


def transformer_fusions(onnx_path: str | os.PathLike, num_heads: int, hidden: int) -> dict:
    """Which of ORT's transformer-optimizer fusions apply to this graph (operator -> count)."""
    from onnxruntime.transformers.optimizer import optimize_model

    m = optimize_model(str(onnx_path), model_type="vit", num_heads=num_heads, hidden_size=hidden, opt_level=0,
                       use_gpu=False)
    return {k: int(v) for k, v in m.get_fused_operator_statistics().items() if v}
