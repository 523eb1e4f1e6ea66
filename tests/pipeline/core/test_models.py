import pytest
import torch

from vitrim.pipeline.core.config import ModelConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import create_model, describe, load_weights, save_weights
from tests.conftest import TINY_KW, random_init


def test_create_with_overrides():
    m = create_model(ModelConfig(arch="deit_tiny_patch16_224", kwargs=dict(TINY_KW)))
    spec = describe(m, "deit_tiny_patch16_224")
    assert spec["embed_dim"] == 32 and spec["depth"] == 2 and spec["num_heads"] == 2
    assert spec["img_size"] == [28, 28] and spec["in_chans"] == 1 and spec["num_classes"] == 10
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_arch_and_kwargs():
    with pytest.raises(UserError, match="not a timm model"):
        create_model(ModelConfig(arch="vit_nonexistent"))
    with pytest.raises(UserError, match="model.kwargs"):
        create_model(ModelConfig(arch="deit_tiny_patch16_224", kwargs={"bogus_arg": 1}))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip_exact(tmp_path, suffix):
    cfg = ModelConfig(arch="deit_tiny_patch16_224", kwargs=dict(TINY_KW))
    m = random_init(create_model(cfg), seed=3)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"model": m.state_dict()}, path)
    else:
        save_weights(m, path)
    cfg.checkpoint = str(path)
    m2 = create_model(cfg).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_corrupt_and_mismatched_checkpoint(tmp_path):
    cfg = ModelConfig(arch="deit_tiny_patch16_224", kwargs=dict(TINY_KW))
    m = create_model(cfg)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="could not be read"):
        load_weights(m, bad)
    other = create_model(ModelConfig(arch="deit_tiny_patch16_224", kwargs={**TINY_KW, "embed_dim": 64}))
    save_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not match the model"):
        load_weights(m, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_weights(m, tmp_path / "nope.pth")


def test_pretrained_offline_is_clear(tmp_path):
    # a fresh process, so huggingface_hub reads HF_HUB_OFFLINE at import (as it would for a user)
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    p = subprocess.run([sys.executable, "-m", "vitrim.pipeline.cli", "train-teacher", "configs/fmnist_cpu.yaml", "--set",
                        "model.arch=deit_tiny_patch16_224", "--set", "model.kwargs={}", "--set", "model.pretrained=true",
                        "--set", f"cache_dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "offline" in p.stderr and "model.checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_unsupported_variants_refused():
    """(Register tokens, qk_norm and 'map' pooling are supported now: tests/pipeline/core/test_variants.py.)"""
    import timm

    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, act_layer=torch.nn.ReLU)
    with pytest.raises(UserError, match="MLP activation ReLU"):
        describe(m)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="max")
    with pytest.raises(UserError, match="global_pool"):
        describe(m)
