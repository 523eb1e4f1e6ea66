"""Runners: the fp32 torch reference runs with TF32 off (no GPU needed to check it)."""
import numpy as np
import timm
import torch

from vitrim.export.runners import TorchRunner, tf32_off
from tests.conftest import TINY_KW, random_init


def _tf32_state() -> tuple:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


class Probe(torch.nn.Module):
    """A real tiny ViT that records the TF32 flags its forward runs under."""

    def __init__(self):
        super().__init__()
        self.vit = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=1)
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append(_tf32_state())
        return self.vit(x)


def test_tf32_off_sets_and_restores_the_flags():
    before = _tf32_state()
    try:
        torch.set_float32_matmul_precision("high")  # what a user (or cuDNN's default) turns on
        torch.backends.cudnn.allow_tf32 = True
        with tf32_off():
            assert _tf32_state() == ("highest", False, False)
        assert _tf32_state() == ("high", True, True)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    assert _tf32_state() == before


def test_fp32_torch_runner_infers_and_times_with_tf32_off():
    """The runner's inference context is device-independent, so this CPU run takes the CUDA reference's path."""
    before = _tf32_state()
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with TorchRunner(Probe(), (1, 28, 28), threads=1) as fp32, TorchRunner(Probe(), (1, 28, 28), half=True) as fp16:
            out = fp32.infer(np.zeros((2, 1, 28, 28), np.float32))
            fp32.time(2, warmup=1, repeats=2)
            fp16.time(2, warmup=1, repeats=1)
        assert out.shape == (2, 10) and np.isfinite(out).all()
        assert len(fp32.model.seen) == 4 and set(fp32.model.seen) == {("highest", False, False)}
        assert set(fp16.model.seen) == {("high", True, True)}  # fp16 has no TF32 to turn off: left as the user set it
        assert _tf32_state() == ("high", True, True)  # restored after each call
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_tf32_off_with_torchs_new_precision_api():
    """torch >= 2.9 refuses to read the legacy flags once TF32 was set through ``fp32_precision``: the new API is used.

    In a subprocess: that state cannot be fully undone in this one (torch keeps which API set it).
    """
    import subprocess
    import sys

    import pytest

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy TF32 flags (tested above)")
    code = """
import torch
from vitrim.export.runners import tf32_off
B = torch.backends
B.cuda.matmul.fp32_precision = "tf32"; B.cudnn.conv.fp32_precision = "tf32"
with tf32_off():
    inside = (B.cuda.matmul.fp32_precision, B.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision())
print(inside, (B.cuda.matmul.fp32_precision, B.cudnn.conv.fp32_precision))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "('ieee', 'ieee', 'highest') ('tf32', 'tf32')"


class _Counted:
    """A runner of planted latency that counts its runs (this test only)."""

    def __init__(self, ms):
        self.ms, self.calls = ms, 0

    def _prepare(self, batch, seed=0):
        pass

    def _run_once(self):
        self.calls += 1
        return self.ms


def test_the_cold_first_run_of_a_visit_is_discarded_only_for_fast_runners():
    """A visit's first run is thrown away for runners under DISCARD_BELOW_MS (cold caches matter there);
    from 20 ms a run every run counts. Ratios are the planted ones either way."""
    from vitrim.export.runners import DISCARD_BELOW_MS, time_ratio_visits

    ref, fast, slow = _Counted(2.0), _Counted(DISCARD_BELOW_MS / 4), _Counted(DISCARD_BELOW_MS * 4)
    rounds, warmup = 3, 2
    timings, visits = time_ratio_visits([ref, fast, slow], batch=1, repeats=12, rounds=rounds, warmup=warmup)
    per_visit, per_ref = 12 // rounds, 12 // rounds // 2
    assert fast.calls == warmup + rounds * (per_visit + 1)  # one discarded run per visit
    assert slow.calls == warmup + rounds * per_visit  # none
    assert ref.calls == warmup + rounds * 3 * (per_ref + 1)  # each round: before the first, after each of the 2
    assert [t.repeats for t in timings[1:]] == [rounds * per_visit] * 2
    assert visits == [[DISCARD_BELOW_MS / 4 / 2.0] * rounds, [DISCARD_BELOW_MS * 4 / 2.0] * rounds]
