"""The user's own path: their timm checkpoint and ImageFolder, data errors, DDP wiring.

Every test writes its own tiny images and checkpoint into tmp_path (no hub, no
Fashion-MNIST), and runs the real commands.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from vitrim.pipeline.cli import main
from vitrim.pipeline.core.models import save_weights
from tests.conftest import TINY_PCFG, random_init

CLASSES = ("ant", "bee", "cat")
KW = dict(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def write_folder(root: Path, channels: int = 3, size: int = 32, n_train: int = 12, n_val: int = 4, seed: int = 0):
    """root/{train,val}/<class>/*.png, each class a different mean brightness (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = 40 + 80 * c
                arr = np.clip(rng.normal(base, 30, (size + 4, size, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(arr[..., 0] if channels == 1 else arr).save(d / f"{i}.png")
    return root


def write_config(tmp_path: Path, data_root: Path, in_chans: int, **extra) -> Path:
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", in_chans=in_chans, **KW), seed=1, std=0.1)
    save_weights(teacher, tmp_path / "my_vit.safetensors")
    cfg = {"name": "user", "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
           "data": {"name": "imagefolder", "root": str(data_root), "val_size": 6, "batch_size": 6,
                    "eval_batch_size": 16},
           # a random-weight teacher (the pipeline's wiring is under test, not its accuracy): near chance
           "model": {"arch": "vit_tiny_patch16_224", "kwargs": dict(KW, in_chans=in_chans),
                     "checkpoint": str(tmp_path / "my_vit.safetensors"), "chance_check": False},
           "target": {"batch": 4, "threads": 1},
           "profile": dict(TINY_PCFG, embed_points=1, repeats=4, warmup=1, checks=1, calibration_plans=1),
           "search": {"budget_fraction": 0.8, "steps": 1, "kd_iters": 2, "saliency_batches": 1},
           "finetune": {"epochs": 1}, "export": {"parity_worst": 1}}
    for k, v in extra.items():
        cfg.setdefault(k.split(".")[0], {})[k.split(".")[1]] = v
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grayscale"])
def test_run_end_to_end_on_users_imagefolder(tmp_path, channels):
    root = write_folder(tmp_path / "imgs", channels)
    cfg = write_config(tmp_path, root, channels)
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "run"
    for f in ("lut.json", "search/plan.json", "search/widths.png", "student.safetensors", "plan.json", "model.onnx",
              "model.ort.onnx", "parity.json", "manifest.json", "report.md", "summary.json", "resolved_config.yaml",
              "teacher/manifest.json", "teacher/model.onnx"):
        assert (out / f).is_file(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["parity"]["images"] == 12  # val/ is the test split: 3 classes x 4
    assert m["device_signature"]["tokens"] == 17 and m["device_signature"]["opt_level"] == "all"
    assert set(m["artifacts"]) >= {"onnx", "engine", "parity", "student", "plan", "lut"}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["spec"]["in_chans"] == channels and plan["spec"]["num_classes"] == 3
    assert main(["verify-manifest", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    # the reported top-1 is the gated engine's, measured on the test split's images (12: a multiple of 1/12)
    assert s["speedup"] > 0 and s["student"]["top1"] == m["accuracy"]["engine_top1"]
    assert abs(s["student"]["top1"] * 12 / 100 - round(s["student"]["top1"] * 12 / 100)) < 0.03
    # issue 21: the preprocessing the engine expects is recorded wherever the results are
    mean = [0.5] if channels == 1 else [0.5, 0.5, 0.5]  # vit_tiny's timm defaults (averaged for one channel)
    for prep in (m["preprocessing"], json.loads((out / "teacher" / "manifest.json").read_text())["preprocessing"],
                 yaml.safe_load((out / "resolved_config.yaml").read_text())["preprocessing"]):
        assert prep["input_size"] == [channels, 32, 32] and prep["mean"] == mean and prep["crop_pct"] == 0.9
        assert prep["channels"] == ("L" if channels == 1 else "RGB") and prep["resize"] == [35, 35]
        assert prep["sources"]["crop_pct"] == "timm default for vit_tiny_patch16_224"
    assert "## Preprocessing" in (out / "report.md").read_text()
    assert "| crop_pct | `0.9` | timm default for vit_tiny_patch16_224 |" in (out / "report.md").read_text()


def test_chance_level_teacher_stops_run_with_exit_2(tmp_path, capsys):
    """A teacher at chance (here random weights) is a finding: exit 2 naming the transforms and the keys, before
    anything is measured or written; model.chance_check=false goes on (test_run_end_to_end_on_users_imagefolder)."""
    root = write_folder(tmp_path / "imgs", 3)
    cfg = write_config(tmp_path, root, 3, **{"model.chance_check": True})
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "near chance" in err and "chance 33.33% (3 classes)" in err and "binomial" in err
    assert "create_transform(is_training=True) with scale=(0.6, 1.0)" in err  # the training transform, resolved
    for key in ("data.augment.scale", "data.augment.color_jitter", "data.augment.auto_augment", "teacher.epochs",
                "model.chance_check=false"):
        assert key in err, key
    assert not (tmp_path / "run").exists() and not any((tmp_path / "cache").glob("lut-*"))


def test_train_teacher_near_chance_exits_2_and_keeps_the_weights(tmp_path, capsys):
    """Classes that the images say nothing about (the same noise in every class folder): `vitrim train-teacher`
    caches the weights, then stops."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split, n in (("train", 12), ("val", 4)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    cfg = write_config(tmp_path, root, 3, **{"model.chance_check": True, "model.checkpoint": None,
                                             "teacher.epochs": 1})
    assert main(["train-teacher", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "near chance" in err and "data.augment.scale" in err and "model.chance_check=false" in err
    assert len(list((tmp_path / "cache").glob("teacher-*.safetensors"))) == 1


def test_transforms_come_from_the_teacher_and_config(tmp_path):
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.core.preprocessing import resolve_preprocessing

    root = write_folder(tmp_path / "imgs", 1, size=20)  # images not at the model's size
    cfg = load_config(write_config(tmp_path, root, 1), ["data.mean=[0.5]", "data.std=[0.25]",
                                                        "data.interpolation=bilinear", "data.crop_pct=1.0"])
    s = build_splits(cfg.data, model_cfg=cfg.model)
    x, y = s.test[0]
    assert x.shape == (1, 32, 32) and s.in_chans == 1 and s.num_classes == 3
    with torch.device("meta"):
        m = timm.create_model("vit_tiny_patch16_224", in_chans=1, **KW)
    d = resolve_preprocessing(cfg.data, None, m).timm_kwargs()
    assert d["mean"] == (0.5,) and d["std"] == (0.25,) and d["interpolation"] == "bilinear" and d["crop_pct"] == 1.0
    # without overrides: the pretrained config's RGB statistics, averaged for a 1-channel teacher
    d0 = resolve_preprocessing(load_config(write_config(tmp_path, root, 1)).data, None, m).timm_kwargs()
    assert len(d0["mean"]) == 1 and d0["input_size"] == (1, 32, 32)


SIDES = ("bottom", "left", "right", "top")  # the classes, in ImageFolder's (sorted) order
BORDER_KW = dict(img_size=32, patch_size=4, num_classes=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_border_folder(root: Path, n_train: int = 40, n_val: int = 10, seed: int = 0) -> Path:
    """32x32 RGB noise with a bright 1-pixel line on one border; the side is the class.

    timm's default eval transform (resize to 35, centre crop 32) cuts every border line away.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, side in enumerate(SIDES):
            d = root / split / side
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 150, (32, 32, 3), dtype=np.uint8)
                {"top": a[0], "bottom": a[-1], "left": a[:, 0], "right": a[:, -1]}[side][...] = 255
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def users_checkpoint(tmp_path_factory):
    """The user's own loop, outside vitrim: ImageNet mean/std, no resize or crop, a tiny ViT trained at 32x32.

    Returns (images root, folder holding my_vit.safetensors + timm's config.json, the loop's test top-1).
    """
    from timm.models._hub import save_config_for_hf
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    d = tmp_path_factory.mktemp("user")
    root = write_border_folder(d / "imgs")
    tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = ImageFolder(str(root / "train"), transform=tf)
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor(train.targets)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **BORDER_KW)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for xb, yb in torch.utils.data.DataLoader(ImageFolder(str(root / "val"), transform=tf), batch_size=7):
            correct += int((model(xb).argmax(1) == yb).sum())
            total += len(yb)
    ckpt_dir = d / "ckpt"
    ckpt_dir.mkdir()
    save_weights(model, ckpt_dir / "my_vit.safetensors")
    save_config_for_hf(model, str(ckpt_dir / "config.json"),
                       data_config=dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0))
    return root, ckpt_dir, 100.0 * correct / total


def _border_config(tmp_path: Path, root: Path, ckpt: Path, *sets: str) -> list[str]:
    cfg = {"name": "user", "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
           "data": {"name": "imagefolder", "root": str(root), "val_size": 8, "batch_size": 8, "eval_batch_size": 16},
           "model": {"arch": "vit_tiny_patch16_224", "kwargs": BORDER_KW, "checkpoint": str(ckpt)},
           "target": {"batch": 4, "threads": 1}, "profile": dict(TINY_PCFG, embed_points=1)}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [str(path)] + [a for s in sets for a in ("--set", s)]


def _eval_top1(capsys, args: list[str]) -> tuple[str, str]:
    assert main(["eval", *args]) == 0
    out = capsys.readouterr().out
    return out.split("test top-1 ")[1].split("%")[0], out


def test_eval_reproduces_the_users_own_loop_from_the_checkpoints_config_json(users_checkpoint, tmp_path, capsys):
    root, ckpt_dir, own = users_checkpoint
    assert own >= 90  # the loop learned the border lines: the comparison below has room to fail
    got, out = _eval_top1(capsys, _border_config(tmp_path, root, ckpt_dir / "my_vit.safetensors"))
    assert got == f"{own:.2f}", out  # the same number, not a close one: the same tensors
    line = next(ln for ln in out.splitlines() if ln.startswith("preprocessing:"))
    assert "crop 1.0 (center)" in line and "(0.485, 0.456, 0.406)" in line and "config.json" in line
    # the same checkpoint without its config.json: timm's defaults for the architecture (the bug)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "my_vit.safetensors").write_bytes((ckpt_dir / "my_vit.safetensors").read_bytes())
    got, out = _eval_top1(capsys, _border_config(tmp_path, root, bare / "my_vit.safetensors"))
    assert float(got) <= own - 30 and "crop 0.9 (center)" in out
    # or the user says it with data.* keys
    got, _ = _eval_top1(capsys, _border_config(tmp_path, root, bare / "my_vit.safetensors", "data.crop_pct=1.0",
                                               f"data.mean={list(IMAGENET_MEAN)}", f"data.std={list(IMAGENET_STD)}"))
    assert got == f"{own:.2f}"


def test_expected_top1_mismatch_stops_run_before_any_artifact(users_checkpoint, tmp_path, capsys):
    root, ckpt_dir, own = users_checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "my_vit.safetensors").write_bytes((ckpt_dir / "my_vit.safetensors").read_bytes())
    args = _border_config(tmp_path, root, bare / "my_vit.safetensors", f"model.expected_top1={own}")
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert f"below model.expected_top1={own:g}" in err and "crop 0.9 (center)" in err
    for key in ("data.crop_pct", "data.mean", "data.std", "data.interpolation", "config.json"):
        assert key in err, key
    assert not (tmp_path / "run").exists()  # no resolved config, no stages.json, no LUT copy
    assert not any((tmp_path / "cache").glob("lut-*"))  # nothing measured either
    # the checkpoint with its config.json meets the expectation
    args = _border_config(tmp_path, root, ckpt_dir / "my_vit.safetensors", f"model.expected_top1={own}")
    _, out = _eval_top1(capsys, args)
    assert f"within 1 pt of model.expected_top1={own:g}" in out


def _cli(args, cwd):
    """`python -m vitrim` as a user types it, from their own directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "vitrim", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env=env)


def _main(args, capfd) -> tuple[int, str]:
    """The same entry point in this process (one interpreter start less): exit code and stderr, file descriptor
    2 included (what a DataLoader worker or a library's C++ writes there)."""
    capfd.readouterr()
    rc = main(list(args))
    return rc, capfd.readouterr().err


def test_data_errors_exit_2_naming_the_input(tmp_path, capfd):
    # an empty class folder, through `python -m vitrim` in a fresh process
    root = write_folder(tmp_path / "a")
    for f in (root / "train" / "bee").iterdir():
        f.unlink()
    p = _cli(["run", str(write_config(tmp_path / "a", root, 3))], tmp_path)
    assert p.returncode == 2 and "bee" in p.stderr and "no images" in p.stderr and "Traceback" not in p.stderr
    # a class count that differs from the teacher's head
    root = write_folder(tmp_path / "b")
    (root / "train" / "dog").mkdir()
    (root / "val" / "dog").mkdir()
    for split in ("train", "val"):
        (root / split / "dog" / "0.png").write_bytes((root / split / "ant" / "0.png").read_bytes())
    rc, err = _main(["run", str(write_config(tmp_path / "b", root, 3))], capfd)
    assert rc == 2 and "4 classes" in err and "3 outputs" in err
    # an unreadable image deep in the split, read by a DataLoader worker process
    root = write_folder(tmp_path / "c")
    bad = root / "val" / "cat" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cfg = write_config(tmp_path / "c", root, 3, **{"data.workers": 1})
    rc, err = _main(["eval", str(cfg), "--split", "test"], capfd)
    assert rc == 2 and str(bad) in err and "Traceback" not in err, err[-2000:]


def test_unavailable_target_fails_before_any_training(tmp_path, capfd):
    root = write_folder(tmp_path / "imgs")
    cfg = write_config(tmp_path, root, 3)
    rc, err = _main(["profile", "build", str(cfg), "--set", "target.backend=tensorrt"], capfd)
    assert rc == 2 and "tensorrt" in err.lower(), err[-1500:]
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing measured
    if not torch.cuda.is_available():  # (with CUDA, torch-cuda is available: nothing to refuse)
        rc, err = _main(["run", str(cfg), "--set", "target.backend=torch-cuda"], capfd)
        assert rc == 2 and "CUDA" in err
        assert not (tmp_path / "run" / "stages.json").exists()
        assert not (tmp_path / "cache").exists()


DDP_SCRIPT = r'''
import os, sys, torch, torch.nn.functional as F
from safetensors.torch import load_file, save_file
from vitrim.pipeline.core.data import TensorImages
from vitrim.pipeline.core.trainer import TrainSpec, train
import timm
d = sys.argv[1]
kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
          qkv_bias=False)
model = timm.create_model("vit_tiny_patch16_224", **kw)
model.load_state_dict(load_file(f"{d}/init.safetensors"))
data = torch.load(f"{d}/data.pt", weights_only=True)
ds = TensorImages(data["x"], data["y"], 0.5, 0.25)
spec = TrainSpec(epochs=1, batch_size=int(sys.argv[2]), lr=1e-3, warmup_epochs=0, clip_grad=1.0, seed=0,
                 max_steps_per_epoch=1)
train(model, lambda m, x, y: F.cross_entropy(m(x), y), ds, spec, f"{d}/ck{os.environ.get('RANK', 's')}",
      device="cpu", log=lambda m: None)
if int(os.environ.get("RANK", 0)) == 0:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3])
'''


@pytest.mark.slow
def test_ddp_step_equals_single_process_step_on_the_concatenated_batch(tmp_path):
    from safetensors.torch import load_file

    B = 4
    # no qkv bias: the key bias has a gradient of exactly zero in theory (softmax is shift-invariant), so its
    # first Adam step, g / (|g| + eps), would only compare float noise
    kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
              qkv_bias=False)
    save_weights(random_init(timm.create_model("vit_tiny_patch16_224", **kw), seed=2, std=0.1),
                 tmp_path / "init.safetensors")
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randint(0, 256, (2 * B, 28, 28), generator=g, dtype=torch.uint8),
                "y": torch.randint(0, 10, (2 * B,), generator=g)}, tmp_path / "data.pt")
    (tmp_path / "step.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = Path(sys.executable).parent / "torchrun"
    # 2 ranks x B images (gloo): the DistributedSampler shards the 2B images, DDP averages the gradients
    p = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 1000),
                        str(tmp_path / "step.py"), str(tmp_path), str(B), str(tmp_path / "ddp.safetensors")],
                       capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # one process, one batch of all 2B images
    p = subprocess.run([sys.executable, str(tmp_path / "step.py"), str(tmp_path), str(2 * B),
                        str(tmp_path / "single.safetensors")], capture_output=True, text=True, timeout=240, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp, single, init = (load_file(str(tmp_path / f)) for f in ("ddp.safetensors", "single.safetensors",
                                                                   "init.safetensors"))
    moved = 0
    for k in init:
        assert torch.allclose(ddp[k], single[k], atol=1e-6, rtol=0), k
        moved += int(not torch.equal(ddp[k], init[k]))
    assert moved > len(init) // 2  # the step really changed the weights
