"""ONNX export of CompactViT and timm teachers.

Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``): the legacy
TorchScript exporter fails on timm's Attention (it passes a tensor as
``is_causal``). Opset >= 17, a dynamic batch dim, ``onnx.checker``, an optional
simplifier (onnxslim) and an fp16 conversion (onnxconverter-common) for
TensorRT 11's strong typing, where fp16 precision means an fp16 ONNX.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitrim.pipeline.core.errors import UserError, install_hint
from vitrim.pipeline.core.io import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines; keep the CLI output readable."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


_TORCHLIB_REGISTRIES: dict = {}
_TORCHLIB_LOCK = threading.RLock()


@contextlib.contextmanager
def _one_torchlib_registry():
    """Build the dynamo exporter's ATen-to-ONNX registry once per opset and reuse it.

    ``torch.onnx.export(dynamo=True)`` rebuilds that registry from torchlib on every call: 0.4-0.8 s on these
    2-core CPUs, about a third of a block micro-model's export, and the profiler exports dozens of them. While
    vitrim exports, ``ONNXRegistry.from_torchlib`` returns a copy of the one built first for that opset (a copy of
    its tables, so a ``custom_translation_table`` registered into it by anyone cannot reach the next export), and
    vitrim's exports run one at a time (they would hold the GIL anyway). That class is torch-internal: where it is
    absent or shaped otherwise, the export runs as torch ships it. The first registry built is the one every later
    export uses: ops of a library imported after it (torchvision's) would be missing, which no ViT needs.
    """
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
        shipped = ONNXRegistry.__dict__["from_torchlib"]
        build = shipped.__func__
    except (ImportError, KeyError, AttributeError):
        yield
        return

    def cached(cls, *args, **kwargs):
        try:
            key = (cls, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # an argument torch passes that cannot key a cache: build as torch does
            return build(cls, *args, **kwargs)
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = build(cls, *args, **kwargs)
        first = _TORCHLIB_REGISTRIES[key]
        if not isinstance(getattr(first, "functions", None), dict):
            return build(cls, *args, **kwargs)
        reg = copy.copy(first)
        reg.functions = {k: list(v) for k, v in first.functions.items()}
        return reg

    with _TORCHLIB_LOCK:
        ONNXRegistry.from_torchlib = classmethod(cached)
        try:
            yield
        finally:
            ONNXRegistry.from_torchlib = shipped


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], opset: int = 18,
                dynamic_batch: bool = True, example_batch: int = 2, simplify: bool = False,
                check: bool = True) -> Path:
    """Export ``model`` (input ``[B, *input_shape]``) to ``path``, atomically.

    Args:
        input_shape: per-sample shape, e.g. ``(1, 28, 28)`` for an image model or
            ``(N, E)`` for a block micro-model.
        dynamic_batch: make dim 0 symbolic (``batch``).
    """
    if opset < 17:
        raise UserError("export", f"opset {opset} is too old", "use export.opset >= 17")
    path = Path(path)
    model = model.eval()
    x = torch.randn(example_batch, *input_shape)
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    arg = _forward_arg_name(model)
    if dyn is not None and arg != "x":
        dyn = {arg: dyn["x"]}
    with atomic_path(path) as tmp, _quiet(), _one_torchlib_registry():
        tmp_onnx = tmp.with_suffix(".onnx")
        try:
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes=dyn, verbose=False)
            prog.save(str(tmp_onnx))
            os.replace(tmp_onnx, tmp)
        finally:
            tmp_onnx.unlink(missing_ok=True)
        # intermediate shapes recorded for the example batch go stale under a dynamic batch, and
        # quantizers then refuse the graph ("Inferred shape and existing shape differ"): drop them
        strip_value_info(tmp)
        if simplify:
            _simplify(tmp)
        if check:
            import onnx

            onnx.checker.check_model(str(tmp), full_check=True)
    return path


def _forward_arg_name(model: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values() if p.name != "self"]
    return params[0].name if params else "x"


def _simplify(path: Path) -> None:
    try:
        import onnxslim
    except ImportError:
        raise UserError("export", "export.simplify=true needs the onnxslim package",
                        install_hint("simplify") + "; or set export.simplify=false") from None
    import onnx

    model = onnxslim.slim(onnx.load(str(path)))
    onnx.save(model, str(path))


FP16_MAX = 65504.0  # the largest finite float16


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike, keep_io_types: bool = True) -> Path:
    """Convert an fp32 ONNX to fp16 (weights and compute), fp32 inputs/outputs kept.

    TensorRT 11 removed weak typing (no ``BuilderFlag.FP16``), so an fp16 engine
    is built from an fp16 ONNX. ORT-CPU runs it too, but computes most of it in
    fp32 (it inserts Casts around every op without an fp16 CPU kernel), so the
    fp16 tests also run it op by op in fp16 with ``onnx.reference``.

    onnxconverter-common clamps weights above ``max_finite_val`` (default 1e4)
    to it, silently changing the model; vitrim passes fp16's own maximum, so a
    representable weight is only rounded, and refuses weights beyond it.

    Raises:
        UserError: a weight or constant exceeds fp16's range.
    """
    import onnx
    from onnx import numpy_helper
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    consts = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                              for a in n.attribute if a.name == "value"]
    for t in consts:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(t)
        a = np.abs(a[np.isfinite(a)])  # +-inf (masks) converts to fp16's inf unchanged
        if a.size and float(a.max()) > FP16_MAX:
            raise UserError("export", f"'{src}': weight '{t.name}' reaches {float(a.max()):.4g}, beyond fp16's "
                            f"range (±{FP16_MAX:g}); the converter would clamp it, changing the model",
                            "use target.precision=fp32 (or int8), or rescale that layer before exporting")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(model, keep_io_types=keep_io_types, max_finite_val=FP16_MAX)
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))
        onnx.checker.check_model(str(tmp))
    return dst


def strip_value_info(path: str | os.PathLike) -> None:
    """Drop intermediate ``value_info`` so quantizers re-infer shapes.

    Exported graphs can carry shapes recorded for the example batch; ORT's
    quantizer then fails ("Inferred shape and existing shape differ").
    """
    import onnx

    m = onnx.load(str(path))
    if len(m.graph.value_info):
        del m.graph.value_info[:]
        onnx.save(m, str(path))


def onnx_io(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]
