"""Slicing makes a real model smaller and faster: DeiT-Small, half the heads and half the MLP.

deit_small_patch16_224 with random weights (no hub download), a plan keeping
heads 0-2 of 6 and the first 768 of 1536 MLP neurons in every block, sliced,
exported with the same exporter as a release, and timed in ONNX Runtime (CPU,
2 threads, batch 8) round-robin with the unpruned model.

    .venv/bin/python benchmarks/slice_deit_small.py
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch

import smoke as smoke_sizes  # benchmarks/smoke.py (a script's own folder is on sys.path)

from vitrim.export.onnx import export_onnx
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.export.runners import interleaved, time_interleaved
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.slicing import slice_model


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (benchmarks/smoke.py); figures mean nothing")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    kwargs = smoke_sizes.DEIT_KW if a.smoke else {}
    res = kwargs.get("img_size", 224)
    teacher = timm.create_model("deit_small_patch16_224", **kwargs).eval()
    spec = describe(teacher, "deit_small_patch16_224", kwargs)
    full = Plan.full(spec)
    half = Plan.full(spec)
    for b in half.blocks:
        b.heads = b.heads[: spec["num_heads"] // 2]
        b.mlp = b.mlp[: spec["mlp_hidden"] // 2]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, plan in (("full", full), ("half", half)):
            model = slice_model(teacher, plan)
            x = torch.randn(2, 3, res, res)
            if name == "full":
                with torch.no_grad():
                    assert torch.equal(model(x), teacher(x))
            paths[name] = export_onnx(model, Path(tmp) / f"{name}.onnx", (3, res, res))
            print(f"{name}: {plan.num_params() / 1e6:.2f}M params, {plan.macs() / 1e9:.2f} GMACs, "
                  f"ONNX {paths[name].stat().st_size / 1e6:.1f} MB")
        runners = [OrtCpuRunner(paths["full"], 2), OrtCpuRunner(paths["half"], 2)]
        with interleaved(runners):
            t_full, t_half = time_interleaved(runners, 8, **smoke_sizes.timing(a.smoke, 20, 5, 3))
    print(f"ORT-CPU batch 8, 2 threads, median of 20 interleaved runs: full {t_full.median_ms:.1f} ms, "
          f"half {t_half.median_ms:.1f} ms -> {t_full.median_ms / t_half.median_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
