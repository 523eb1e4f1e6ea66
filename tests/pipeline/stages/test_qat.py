"""Quantization-aware recovery of an int8 engine that fails the gate (issue 16)."""
import json

import pytest
import torch

from vitrim.pipeline.core.config import QuantConfig, load_config
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.slicing import full_size_compact
from vitrim.pipeline.stages.qat import FakeQuantLinear, add_fake_quant, remove_fake_quant
from tests.conftest import INT8_SETS


def tiny_cfg(d, fmnist_dir, *extra):
    return load_config(None, [f"cache_dir={d}", f"data.root={fmnist_dir}", *INT8_SETS, "target.precision=int8",
                              "target.batch=32", "target.threads=1", "profile.warmup=1", "profile.repeats=5", "profile.min_visit_ms=0",
                              "profile.remeasure_spread_pct=0", *extra])


@pytest.fixture(scope="module")
def trained(int8_teacher):
    return int8_teacher


def test_fake_quant_wraps_every_linear_and_unwraps_exactly(trained):
    _, teacher, splits = trained
    student, _ = full_size_compact(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = splits.test[list(range(16))][0]
    with torch.no_grad():
        ref = student.eval()(x)
        n = add_fake_quant(student, QuantConfig(op_types=["MatMul"]))
        assert n == sum(isinstance(m, FakeQuantLinear) for m in student.modules()) == 2 * 4 + 1  # qkv/proj/fc1/fc2, head
        fq = student(x)
    # quantization moves the logits, a little; the head (2-D input: an ONNX Gemm) is not in op_types
    d = (fq - ref).abs().max().item()
    assert 0 < d < 0.5 * ref.abs().max().item()
    head = student.head
    assert isinstance(head, FakeQuantLinear) and torch.equal(head(x.new_ones(2, 32)), head.linear(x.new_ones(2, 32)))
    # straight-through gradients reach every weight
    student.train()
    student(x).sum().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert remove_fake_quant(student) == n and not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    after = student.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _plant_activation_outliers(student, k: float = 300.0) -> None:
    """Scale channel 0 of every block's MLP input by ``k`` and its fc1 weights by ``1/k``: the fp32 network
    computes the same function, but a per-tensor int8 activation range is now set by that one channel, so
    the other channels are left a few int8 levels (the outlier channels of SmoothQuant, LLM.int8())."""
    with torch.no_grad():
        for blk in student.blocks:
            blk.norm2.weight[0] *= k
            blk.norm2.bias[0] *= k
            blk.mlp.fc1.weight[:, 0] /= k


def _int8_fit(onnx_path, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """An int8 ONNX model's top-1 agreement with, and KL to, the reference logits on ``x`` (ORT, 1 thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    e = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    kl = torch.nn.functional.kl_div(e.log_softmax(1), ref.log_softmax(1), reduction="batchmean", log_target=True)
    return {"agree": float((e.argmax(1) == ref.argmax(1)).float().mean()), "kl": float(kl)}


def test_int8_gate_failure_runs_recovery_that_repairs_the_engine(trained, fmnist_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from vitrim.export.parity import ParityError
    from vitrim.pipeline.stages.qat import release_student

    d, teacher, splits = trained
    student, _ = full_size_compact(teacher)
    _plant_activation_outliers(student)
    x = splits.test[list(range(len(splits.test)))][0]
    with torch.no_grad():
        ref = teacher.eval()(x)  # what the student computed before recovery: the gate's first reference
        assert torch.allclose(student.eval()(x), ref, atol=1e-4, rtol=0)  # the planting is exact in fp32
    orig = {k: v.clone() for k, v in student.state_dict().items()}  # recovery trains the student in place
    # the gate's int8 agreement floor at 85%: the planted outliers fail it (measured 61%) and a working
    # recovery clears it with room (measured 93%). The other checks are left wide: at 93% agreement the
    # recovered engine is still far from the planted model's logits (its worst image, its class shares), and
    # on 384 images the accuracy loss moves by whole images, which int8 kernels that differ between CPUs
    # decide. What this test pins is the mechanism: the first gate fails, recovery runs and repairs
    cfg = tiny_cfg(d, fmnist_dir, "export.int8_recovery_steps=30", "export.int8_recovery_lr=3e-4",
                   "export.int8.min_top1_agreement=0.85", "export.int8.max_acc_loss=5.0",
                   "export.int8.max_rel_l2=5.0", "export.int8.max_mean_rel_l2=1.0", "export.int8.max_prob_js=1.0",
                   "export.int8.max_mean_prob_js=1.0", "export.int8.max_class_shift=0.2")
    out = tmp_path / "rel"
    logs = []

    def log(m: str) -> None:
        logs.append(m)
        if "[int8-recovery] the int8 engine failed the gate" in m:  # keep the failing engine for the comparison
            shutil.copy(out / "model.int8.onnx", tmp_path / "before.int8.onnx")

    try:
        res, err = release_student(cfg, teacher, student, student.plan, splits, out, log=log), None
    except ParityError as e:
        res, err = None, e
    assert (tmp_path / "before.int8.onnx").is_file(), logs  # the first gate failed and recovery ran
    before = _int8_fit(tmp_path / "before.int8.onnx", x, ref)
    after = _int8_fit(out / "model.int8.onnx", x, ref)
    # recovery was needed (measured: agreement 61%, KL 0.078) and did its job: the re-quantized engine of the
    # recovered weights is far closer to the model the user validated (measured: 93%, KL 0.008); a recovery
    # that changes nothing, or re-quantizes the old weights, leaves both figures where they were
    assert before["agree"] < 0.8, before
    assert after["agree"] > before["agree"] + 0.15 and after["kl"] < 0.3 * before["kl"], (before, after)
    print("int8 engine against the fp32 student before recovery:", before, "after:", after)
    rec = load_file(str(out / "int8_recovery" / "student.safetensors"))
    assert any(not torch.equal(rec[k], orig[k]) for k in rec if k.endswith("qkv.weight"))
    assert not (out / "int8_recovery" / "checkpoint.pt").exists()
    assert err is None, err  # the recovered engine passes the re-gate against the validated model
    m = json.loads((out / "manifest.json").read_text())
    assert m["int8_recovery"]["before"]["top1_agreement"] < 0.8
    # the re-gate's reference did not move: the fp32 student before recovery, not the recovered weights
    assert res["parity"]["torch_top1"] == m["int8_recovery"]["before"]["torch_top1"]
    assert "before recovery" in res["parity"]["reference"]
    assert m["artifacts"]["student"]["path"].endswith("int8_recovery/student.safetensors")


def test_recovery_settings_are_checked(fmnist_dir, tmp_path):
    with pytest.raises(UserError, match="export.int8_recovery_steps"):
        tiny_cfg(tmp_path, fmnist_dir, "export.int8_recovery_steps=-1")
    with pytest.raises(UserError, match="export.int8_recovery_lr"):
        tiny_cfg(tmp_path, fmnist_dir, "export.int8_recovery_lr=0")
