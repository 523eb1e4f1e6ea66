"""Every release holds ``model.pt2``: the student as a ``torch.export`` program that plain torch loads.

The program is loaded in a fresh interpreter that never imports vitrim (checked through ``sys.modules``),
with ``torch.export.load(...).module()`` only, and its logits equal the model's; the manifest hashes it.
"""
import json
import subprocess
import sys

import numpy as np
import timm
import torch

from vitrim.export.manifest import verify_manifest
from vitrim.export.release import release
from vitrim.export.target import Target
from vitrim.pipeline.core.slicing import full_size_compact
from tests.conftest import TINY_KW, random_init

LOAD = """
import sys
import numpy as np
import torch
model = torch.export.load(sys.argv[1]).module()
with torch.no_grad():
    y = model(torch.from_numpy(np.load(sys.argv[2])))
np.save(sys.argv[3], y.numpy())
assert not [m for m in sys.modules if m.split(".")[0] == "vitrim"], "vitrim was imported"
"""


def _batches(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.standard_normal((size, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, size)


def test_release_holds_a_torch_program_that_loads_without_vitrim(tmp_path):
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW, reg_tokens=2), seed=3, std=0.2)
    student, _ = full_size_compact(teacher)  # a CompactViT with register tokens
    out = tmp_path / "rel"
    release(out, Target(batch=8, threads=1), _batches(2), model=student, warmup=1, repeats=5, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["artifacts"]["torch_program"]["path"] == "model.pt2"
    verify_manifest(out)

    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([sys.executable, "-c", LOAD, str(out / "model.pt2"), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    with torch.no_grad():
        want = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=0, atol=1e-5)
