"""MODEL_CARD.md: Hugging Face front matter that matches the manifest, and a run snippet that feeds the engine
exactly what vitrim fed it (checked by running the snippet on real image files)."""
import ast
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import yaml
from PIL import Image

from vitrim.export.card import write_model_card
from vitrim.export.release import release, release_from_config
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.export.target import Target
from vitrim.pipeline.core.config import DataConfig
from vitrim.pipeline.core.data import build_splits, make_loader
from vitrim.pipeline.core.io import sha256_file
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.pipeline.core.slicing import slice_model
from tests.conftest import TINY_KW, random_init


def front_matter(text: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "no YAML front matter"
    return yaml.safe_load(m.group(1))


def run_snippet(card: str, release_dir, image, which: int = 0) -> np.ndarray:
    """The card's Python example (``which``: 0 onnxruntime, 1 torch), saved as run.py in the release and run on
    one image file."""
    code = re.findall(r"```python\n(.*?)```", card, re.S)[which]
    (release_dir / "run.py").write_text(code)
    p = subprocess.run([sys.executable, "run.py", str(image)], cwd=release_dir, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return np.asarray(ast.literal_eval(p.stdout.split("logits", 1)[1].strip()), dtype=np.float32)


def test_card_front_matter_matches_the_manifest_and_its_snippet_runs(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    splits = build_splits(cfg.data)
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=1)
    plan = Plan.full(slice_model(teacher, Plan.full(_spec(teacher))).plan.spec)
    plan.blocks[0].mlp = plan.blocks[0].mlp[:16]
    student = slice_model(teacher, plan)
    out = RunDir(tmp_path / "rel").mkdir()
    plan.save(out.plan)  # the release lists its plan; the card summarizes it
    release_from_config(cfg, student, out.root, splits.test, plan=plan, name="student", log=lambda m: None)

    m = json.loads(out.manifest.read_text())
    card = out.model_card.read_text()
    fm = front_matter(card)
    assert fm["pipeline_tag"] == "image-classification" and fm["datasets"] == ["fashion_mnist"]
    (entry,) = fm["model-index"]
    (res,) = entry["results"]
    assert entry["name"] == m["model"]["name"] == "student"
    assert res["task"]["type"] == "image-classification"
    assert res["dataset"] == {"name": "Fashion-MNIST", "type": "fashion_mnist", "split": "test",
                              "args": {"test_limit": cfg.data.test_limit}}
    metrics = {x["type"]: x for x in res["metrics"]}
    assert set(metrics) == {"accuracy", "latency"}  # an export alone has no teacher to measure a speedup against
    assert metrics["accuracy"]["value"] == m["accuracy"]["engine_top1"]
    assert metrics["accuracy"]["args"]["images"] == m["accuracy"]["images"] == cfg.data.test_limit
    assert metrics["latency"]["value"] == m["latency"]["median_ms"]
    assert metrics["latency"]["args"]["batch"] == m["latency"]["batch"] == cfg.target.batch
    assert metrics["latency"]["args"]["device_signature"] == m["device_signature"]
    assert fm["vitrim"]["engine_sha256"] == m["artifacts"]["engine"]["sha256"]
    assert m["files"][out.model_card.name]["sha256"] == sha256_file(out.model_card)  # the manifest covers the card
    assert fm["vitrim"]["preprocessing"] == m["preprocessing"] and fm["vitrim"]["device_signature"] == m["device_signature"]
    assert plan.summary() in card and "## Limits" in card and m["device_signature"]["device"] in card
    # the release says how it was made: its resolved config, which `vitrim compare` reads the test data from
    assert yaml.safe_load(out.resolved_config.read_text())["data"]["test_limit"] == cfg.data.test_limit

    # the example feeds the engine what vitrim fed it: a test image as a PNG file, through the snippet
    raw = splits.test.images[0].numpy()
    Image.fromarray(raw, mode="L").save(tmp_path / "img.png")
    got = run_snippet(card, out.root, tmp_path / "img.png")
    with OrtCpuRunner(out.onnx, 1) as r:
        want = r.infer(splits.test[0][0][None].numpy())[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert 'torch.export.load("model.pt2").module()' in card and "import vitrim" not in card
    np.testing.assert_allclose(run_snippet(card, out.root, tmp_path / "img.png", which=1), want, atol=1e-5, rtol=1e-5)

    # vitrim run adds the speedup it measured, with the device signature
    fm = front_matter(write_model_card(out.root, dataset=res["dataset"], speedup={"value": 1.7, "teacher_ms": 2.0})
                      .read_text())
    sp = [x for x in fm["model-index"][0]["results"][0]["metrics"] if x["type"] == "speedup"]
    assert sp and sp[0]["value"] == 1.7 and sp[0]["args"]["device_signature"] == m["device_signature"]


def _spec(model):
    from vitrim.pipeline.core.models import describe

    return describe(model, "vit_tiny_patch16_224", dict(TINY_KW))


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_card_snippet_resizes_and_crops_like_the_evaluation(tmp_path, crop_mode):
    """RGB images of odd sizes, landscape and portrait: the snippet's resize and crop must match timm's
    transform pixel for pixel (a rounding of the resized side or the crop offset moves the logits)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 1)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate([(45, 37), (37, 45), (50, 41)][:n]):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    kw = dict(TINY_KW, img_size=32, patch_size=8, in_chans=3, num_classes=2)
    model = random_init(timm.create_model("vit_tiny_patch16_224", **kw), seed=2)
    dcfg = DataConfig(name="imagefolder", root=str(root), val_size=1, crop_pct=0.875, crop_mode=crop_mode,
                      interpolation="bicubic", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    splits = build_splits(dcfg, model=model)
    out = RunDir(tmp_path / "rel")
    release(out.root, Target(batch=2, threads=1), make_loader(splits.test, 2), model=model, warmup=1, repeats=3,
            preprocessing=splits.preprocessing, log=lambda m: None)
    card = out.model_card.read_text()
    assert "import timm" not in card  # the plain PIL + numpy recipe, not timm's transform
    with OrtCpuRunner(out.onnx, 1) as r:
        for i, (path, _) in enumerate(splits.test.samples):
            want = r.infer(splits.test[i][0][None].numpy())[0]
            np.testing.assert_allclose(run_snippet(card, out.root, path), want, atol=1e-4, rtol=1e-4)
