"""Quantization-aware recovery for an int8 engine that fails the gate (issue 16).

A pruned student can lose more accuracy when quantized than either step costs
alone. When the student's int8 engine fails the parity gate, ``vitrim run``
calls :func:`recover_int8`: a short KD pass (``export.int8_recovery_steps``,
at most one epoch, AdamW at ``export.int8_recovery_lr``) in which every
``nn.Linear`` that ONNX Runtime's quantizer turns into an int8 op sees its
input and its weight through torch's fake-quantize modules
(``torch.ao.quantization.FakeQuantize``: quantize-dequantize forward,
straight-through gradient), with the scheme of ``target.quant``:

* activations: static QDQ -> int8, asymmetric, per tensor, a moving min/max
  (the ``minmax`` calibration's statistic); dynamic -> uint8, asymmetric, the
  range of each batch (ONNX's ``DynamicQuantizeLinear``);
* weights: int8, symmetric (-127..127), per tensor, or per output channel
  with ``per_channel``;
* which layers: the exporter writes a Linear on tokens (3-D) as ``MatMul`` and
  the head (2-D) as ``Gemm``, so a layer is fake-quantized only on inputs whose
  op type is in ``target.quant.op_types``.

The fake-quant modules are then removed and the adapted fp32 weights go through
the same ORT quantizer and calibration as before (post-training quantization of
a quantization-aware model): the engine's scales are ORT's own, not the
observers'. The re-gate's reference is the fp32 student *before* recovery (the
model the user validated), with every int8 check: the recovered weights'
own fp32 function is not what was validated (quantization-aware training
makes them rely on the quantization), so gating against them would let the
recovery pass by moving the reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitrim.pipeline.core.config import QuantConfig, RunConfig


class FakeQuantLinear(nn.Module):
    """``linear`` with its input and weight fake-quantized as ORT's quantizer will quantize them."""

    def __init__(self, linear: nn.Linear, q: QuantConfig):
        super().__init__()
        from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                           MovingAveragePerChannelMinMaxObserver)

        self.linear = linear
        dynamic = q.mode == "dynamic"
        self.act = FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=1.0 if dynamic else 0.01,
                                quant_min=0 if dynamic else -128, quant_max=255 if dynamic else 127,
                                dtype=torch.quint8 if dynamic else torch.qint8, qscheme=torch.per_tensor_affine)
        if q.per_channel:
            self.weight_fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                          quant_min=-127, quant_max=127, dtype=torch.qint8,
                                          qscheme=torch.per_channel_symmetric, ch_axis=0)
        else:
            self.weight_fq = FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=1.0,
                                          quant_min=-127, quant_max=127, dtype=torch.qint8,
                                          qscheme=torch.per_tensor_symmetric)
        self.op_types = set(q.op_types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ("Gemm" if x.dim() == 2 else "MatMul") not in self.op_types:
            return self.linear(x)
        return F.linear(self.act(x), self.weight_fq(self.linear.weight), self.linear.bias)


def add_fake_quant(model: nn.Module, q: QuantConfig) -> int:
    """Wrap every ``nn.Linear`` of ``model`` in place; the number wrapped."""
    n = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, child_name, FakeQuantLinear(child, q))
                n += 1
    return n


def remove_fake_quant(model: nn.Module) -> int:
    """Undo :func:`add_fake_quant` (the adapted Linear layers stay); the number unwrapped."""
    n = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, FakeQuantLinear):
                setattr(mod, child_name, child.linear)
                n += 1
    return n


def recover_int8(cfg: RunConfig, teacher: nn.Module, student: nn.Module, train_set, out_dir: str | Path,
                 device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """KD with int8 fake-quant on ``student`` (in place); returns what was done, for the manifest."""
    from vitrim.pipeline.core.trainer import TrainSpec, train
    from vitrim.pipeline.core.distill import make_kd_fn

    e, f = cfg.export, cfg.finetune
    steps = e.int8_recovery_steps
    wrapped = add_fake_quant(student, cfg.target.quant)
    spec = TrainSpec(epochs=1, batch_size=cfg.data.batch_size, lr=e.int8_recovery_lr, min_lr=e.int8_recovery_lr / 10,
                     weight_decay=f.weight_decay, warmup_epochs=0.0, clip_grad=f.clip_grad, ema=None, amp="off",
                     seed=cfg.seed, workers=cfg.data.workers, max_steps_per_epoch=steps)
    kd = make_kd_fn(teacher.to(device), f.alpha, f.temperature, f.label_smoothing)
    log(f"[int8-recovery] {steps} KD steps with int8 fake-quant on {wrapped} Linear layers "
        f"({cfg.target.quant.mode}, {'per-channel' if cfg.target.quant.per_channel else 'per-tensor'} weights, "
        f"ops {sorted(cfg.target.quant.op_types)}), lr {e.int8_recovery_lr:g}")
    distilled = getattr(student, "head_dist", None) is not None
    if distilled:
        student.distilled_training = True  # train both heads, as the fine-tune did
    try:
        res = train(student, kd, train_set, spec, Path(out_dir), device=device, desc="int8-recovery", log=log)
    finally:
        remove_fake_quant(student)
        if distilled:
            student.distilled_training = False
    student.to("cpu").eval()
    return {"steps": steps, "lr": e.int8_recovery_lr, "linear_layers": wrapped, "wall_s": round(res.wall_s, 1),
            "train_loss": res.history[-1].get("train_loss") if res.history else None}


def release_student(cfg: RunConfig, teacher: nn.Module, student: nn.Module, plan, splits, out_dir: str | Path,
                    predicted_ms=None, device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Release the student; an int8 engine that fails the gate gets one recovery pass and is re-gated.

    The recovered weights are written to the run's ``int8_recovery_dir`` (the fine-tuned fp32 student in
    ``OUT`` is left as it was) and the manifest records the pass and both gates' figures.
    """
    from vitrim.export.parity import ParityError
    from vitrim.export.release import release_from_config
    from vitrim.pipeline.core.rundir import RunDir
    from vitrim.pipeline.core.slicing import save_compact

    out = Path(out_dir)
    rec = RunDir(out).int8_recovery_dir
    kw = dict(plan=plan, predicted_ms=predicted_ms, name="student", calib_set=splits.val, log=log,
              preprocessing=splits.preprocessing)
    try:
        return release_from_config(cfg, student, out, splits.test, **kw)
    except ParityError as e:
        if cfg.target.precision != "int8" or cfg.export.int8_recovery_steps <= 0:
            raise
        before = e.report
    log(f"[int8-recovery] the int8 engine failed the gate (top-1 {before['engine_top1']:.2f}% against "
        f"{before['torch_top1']:.2f}% in fp32 torch, agreement {100 * before['top1_agreement']:.2f}%); recovering")
    import copy

    validated = copy.deepcopy(student).cpu().eval()  # the re-gate's reference: the model the user validated
    info = recover_int8(cfg, teacher, student, splits.train, rec.root, device=device, log=log)
    rec.checkpoint.unlink(missing_ok=True)
    save_compact(student, plan, rec.root)
    info["before"] = {k: before.get(k) for k in ("torch_top1", "engine_top1", "top1_agreement", "failures")}
    try:
        res = release_from_config(cfg, student, out, splits.test, reference_model=validated,
                                  manifest_extra={"int8_recovery": info}, weights=rec.student, **kw)
    except ParityError as e2:
        raise ParityError(f"{e2}\n  (after {info['steps']} int8-recovery steps; raise export.int8_recovery_steps "
                          f"or set target.quant.mode=dynamic / precision=fp32)", e2.report) from None
    res["int8_recovery"] = info
    log(f"[int8-recovery] recovered: the int8 engine now passes the gate ({info['wall_s']:.0f}s of recovery)")
    return res
