"""The fp16 path without a GPU (issue 21).

The fp16 ONNX that a TensorRT fp16 engine is built from (``to_fp16`` of the
exported model, as ``release`` and ``engine`` make it) is checked against the fp32
torch reference with the fp16 gate, on real Fashion-MNIST images, for the
embedded default's teacher architecture and for a merged student, each with a
planted large activation (one residual channel near 300: its square overflows
fp16's 65504).

Two CPU executors run that ONNX:

* ONNX Runtime's CPU provider, as a user would. It has fp16 kernels for data
  movement only (Reshape, Transpose, Slice, ...) and inserts Casts to fp32
  around every other op, so it checks the fp16 weights but not fp16 arithmetic:
  the old merge's overflow passed there.
* :class:`Fp16OpByOp`: ``onnx.reference`` runs the same graph op by op in numpy,
  every intermediate tensor stored in fp16 (inf past 65504), as a strongly
  typed TensorRT engine stores them. Three ops follow what fp16 kernels do
  rather than the naive numpy: LayerNormalization takes its mean and variance
  in fp32 (the ONNX spec's ``stash_type=1``; ORT's and TensorRT's normalization
  kernels do too), MatMul accumulates in fp32 and rounds its output to fp16
  (tensor-core GEMMs), and Erf is evaluated in fp32 and rounded (speed).
"""
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import yaml

from vitrim.export.engine import build_engine
from vitrim.export.onnx import FP16_MAX, export_onnx, to_fp16
from vitrim.export.parity import Tolerances, check_parity
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.export.runners import Runner, TorchRunner
from vitrim.export.target import Target
from vitrim.pipeline.core.config import ExportConfig
from vitrim.pipeline.core.data import load_fmnist
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.slicing import slice_model
from tests.conftest import random_init

REPO = Path(__file__).resolve().parents[2]
DEFAULT_KW = yaml.safe_load((REPO / "configs" / "fmnist_cpu.yaml").read_text())["model"]["kwargs"]
PLANTED = 300.0  # one patch-embed output channel's bias: 300**2 = 90000 > 65504
SHAPE = (1, 28, 28)


class Fp16OpByOp(Runner):
    """An ONNX graph run op by op with numpy (``onnx.reference``), each tensor kept in its graph dtype."""

    name = "onnx-reference"

    def __init__(self, path: str | Path):
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun
        from scipy.special import erf

        class LayerNormalization(OpRun):
            def _run(self, X, Scale, B=None, axis=-1, epsilon=1e-5, stash_type=1):
                x = X.astype(np.float32)  # stage one in fp32 (stash_type=1), as the spec and fp16 kernels do
                ax = tuple(range(axis % X.ndim, X.ndim))
                mean = x.mean(ax, keepdims=True)
                d = x - mean
                inv = 1.0 / np.sqrt((d * d).mean(ax, keepdims=True) + epsilon)
                y = d * inv * Scale.astype(np.float32) + (0.0 if B is None else B.astype(np.float32))
                return y.astype(X.dtype), mean, inv

        class MatMul(OpRun):
            def _run(self, a, b):  # fp32 accumulation, output rounded to the graph's dtype
                return (np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype),)

        class Erf(OpRun):
            def _run(self, x):
                return (erf(x.astype(np.float32)).astype(x.dtype),)

        self.path = str(path)
        self.ev = ReferenceEvaluator(self.path, new_ops=[LayerNormalization, MatMul, Erf])
        self.input_name = self.ev.input_names[0]

    def infer(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as inf/NaN in the output
            return self.ev.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def float_dtypes(self, x: np.ndarray) -> set[str]:
        """The dtypes of every floating-point tensor the graph computes between its fp32 input and output casts."""
        with np.errstate(over="ignore", invalid="ignore"):
            res = self.ev.run(None, {self.input_name: x}, intermediate=True)
        io = set(self.ev.input_names) | set(self.ev.output_names)
        return {str(v.dtype) for k, v in res.items() if k not in io and isinstance(v, np.ndarray) and v.dtype.kind == "f"}

    def sample_shape(self) -> tuple[int, ...]:
        return SHAPE


def default_teacher() -> torch.nn.Module:
    """The embedded default's teacher architecture (configs/fmnist_cpu.yaml), random weights, one planted channel."""
    model = random_init(timm.create_model("vit_tiny_patch16_224", **DEFAULT_KW), seed=0, std=0.1)
    with torch.no_grad():
        model.patch_embed.proj.bias[5] = PLANTED
    return model


def merged_student() -> torch.nn.Module:
    """A student of that teacher: two token merges (4x4 -> 4x2 -> 2x2), 48 of 64 channels (the planted one kept),
    blocks 1, 6 and 7 skipped, narrower MLP and attention in two blocks."""
    teacher = default_teacher()
    plan = Plan.full(describe(teacher)).set_merges({2: "w", 5: "h"})
    plan.embed_keep = plan.embed_keep[:48]
    for i in (1, 6, 7):
        plan.blocks[i].keep = False
    plan.blocks[2].mlp = plan.blocks[2].mlp[:128]
    plan.blocks[3].heads = plan.blocks[3].heads[:3]
    return slice_model(teacher, plan.validate())


MODELS = {"default_teacher": default_teacher, "merged_student": merged_student}


@pytest.fixture(scope="module")
def fmnist_batches(fmnist_dir):
    x, y = load_fmnist(fmnist_dir, "test")[list(range(256))]
    return [(x[i:i + 64].numpy(), y[i:i + 64].numpy()) for i in range(0, 256, 64)]


def largest_activation(model: torch.nn.Module, x: np.ndarray) -> float:
    """max |x| on the residual stream where it enters the token merges of the fp32 model (a teacher: its blocks)."""
    seen = [0.0]
    mods = list(getattr(model, "merges", {}).values()) or list(model.blocks)
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(float(a[0].abs().max()))) for m in mods]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return max(seen)


@pytest.mark.parametrize("which", list(MODELS))
def test_fp16_onnx_passes_the_fp16_gate_with_a_large_activation(tmp_path, fmnist_batches, which):
    """The fp16 ONNX TensorRT would build from, run in fp16, passes the fp16 gate against fp32 torch: no NaN."""
    model = MODELS[which]().eval()
    x0 = fmnist_batches[0][0]
    assert largest_activation(model, x0) >= 256  # the planted channel's square overflows fp16
    fp16 = to_fp16(export_onnx(model, tmp_path / "model.onnx", SHAPE), tmp_path / "model.fp16.onnx")
    emu = Fp16OpByOp(fp16)
    assert emu.float_dtypes(x0[:2]) == {"float16"}  # fp16 throughout: no fp32 island hides an overflow
    tol = Tolerances.for_precision(ExportConfig(), "fp16")
    with TorchRunner(model, SHAPE) as ref:
        want = ref.infer(x0)
        for engine in (OrtCpuRunner(fp16, threads=1), emu):
            with engine:
                got = engine.infer(x0)
                assert np.isfinite(got).all(), f"{engine.name}: NaN/Inf in the fp16 output"
                rep = check_parity(ref, engine, fmnist_batches, tol, "fp16", 2)
            assert rep.passed, (engine.name, rep.failures)
    assert np.abs(emu.infer(x0) - want).max() > 0  # it really computed in fp16


def test_torch_fp16_target_of_a_merged_student_passes_the_fp16_gate(tmp_path, fmnist_batches):
    """The torch-cpu fp16 target (a saved torch.export program in half precision) gives no NaN and passes the gate."""
    model = merged_student().eval()
    target = Target(backend="torch-cpu", precision="fp16", batch=8, threads=1)
    engine = build_engine(None, tmp_path, target, SHAPE, model=model)
    tol = Tolerances.for_precision(ExportConfig(), "fp16")
    with TorchRunner(model, SHAPE) as ref, engine.runner(target) as run:
        x0 = fmnist_batches[0][0]
        got = run.infer(x0)
        assert np.isfinite(got).all()
        assert np.abs(got - ref.infer(x0)).max() > 0  # it really ran in half precision
        rep = check_parity(ref, run, fmnist_batches, tol, "fp16", 2)
    assert rep.passed, rep.failures


def test_to_fp16_keeps_representable_weights_and_refuses_the_rest(tmp_path):
    """onnxconverter-common clamps weights above 1e4 to 1e4 by default: a different model, silently."""
    from onnx import numpy_helper

    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.bias[0] = 3e4  # fp16 holds it (rounded to 30000 exactly)
    path = export_onnx(lin, tmp_path / "lin.onnx", (8,))
    half = onnx.load(str(to_fp16(path, tmp_path / "lin.fp16.onnx")))
    bias = next(numpy_helper.to_array(i) for i in half.graph.initializer if i.name.endswith("bias"))
    assert bias.dtype == np.float16 and float(bias[0]) == 3e4
    with torch.no_grad():
        lin.bias[0] = 2 * FP16_MAX
    path = export_onnx(lin, tmp_path / "big.onnx", (8,))
    with pytest.raises(UserError, match="beyond fp16's range"):
        to_fp16(path, tmp_path / "big.fp16.onnx")
