import json

from vitrim.pipeline.stages.teacher import load_teacher, teacher_path


def test_tiny_teacher_beats_chance_and_is_cached(tiny_cfg):
    model, info = load_teacher(tiny_cfg)
    assert info["test_top1"] > 30.0, info  # chance is 10%
    path = teacher_path(tiny_cfg)
    assert path.is_file() and json.loads(path.with_suffix(".json").read_text())["test_top1"] == info["test_top1"]
    assert not list(path.parent.glob(".*.work/checkpoint.pt"))
    again, info2 = load_teacher(tiny_cfg)
    assert info2["source"] == str(path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert a.equal(b)


def test_sigterm_during_train_teacher_saves_and_resumes(tmp_path, fmnist_dir):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "vitrim", "train-teacher", "configs/fmnist_cpu.yaml", "--set", f"data.root={fmnist_dir}",
           "--set", f"cache_dir={tmp_path}", "--set", "data.train_limit=16384", "--set", "data.batch_size=32",
           "--set", "teacher.epochs=3", "--set", "model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, "
           "num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in p.stdout:
        if "epoch 1/3" in line:
            break
        assert time.time() < deadline
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint saved" in err and "Traceback" not in err
    work = list(tmp_path.glob(".teacher-*.work/checkpoint.pt"))
    assert len(work) == 1 and not list(tmp_path.glob("teacher-*.safetensors"))
