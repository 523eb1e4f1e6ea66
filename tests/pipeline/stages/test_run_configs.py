"""End to end on the shipped configs beyond the default: the demo on OpenVINO (issue 34) and a register-token ViT
(issue 35), each shrunk with --set to a tiny slice as test_run.py does."""
import json

import pytest

from tests.pipeline.stages.test_run import TINY
from tests.test_release_workflow import GATE  # vitrim compare on tiny engines: room for sub-millisecond noise
from vitrim.export.backends import BACKENDS
from vitrim.export.manifest import verify_manifest
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.rundir import RunDir


def _sets(*extra):
    out = []
    for s in [*TINY, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_openvino_demo_config_runs_end_to_end_and_compares(tmp_path, fmnist_dir):
    """`vitrim run configs/fmnist_openvino.yaml`: an OpenVINO table, the search and closed loop on it, an IR engine
    gated and released with a model card and a Triton repository (OpenVINO backend); `vitrim compare` of the
    release against a copy of itself passes on OpenVINO."""
    if BACKENDS["openvino"].availability():
        pytest.skip(BACKENDS["openvino"].availability())
    run, triton = tmp_path / "run", tmp_path / "triton"
    assert main(["run", "configs/fmnist_openvino.yaml",
                 *_sets(f"data.root={fmnist_dir}", f"out_dir={run}", f"cache_dir={tmp_path / 'cache'}",
                        f"export.triton={triton}", "export.triton_name=fmnist_ov", "search.measured_rounds=1",
                        *GATE)]) == 0
    rd = RunDir(run)
    m = verify_manifest(run)
    sig = m["device_signature"]
    assert sig["backend"] == "openvino" and "inference_precision=f32" in sig["options"]
    assert (run / "model.ov.xml").is_file() and (run / "model.ov.bin").is_file()
    assert json.loads(rd.lut.read_text())["signature"]["backend"] == "openvino"
    v = json.loads(rd.verdict.read_text())
    assert v["outcome"] == "pass" and {g["gate"] for g in v["gates"]} >= {"parity"}
    assert "openvino" in (run / "MODEL_CARD.md").read_text()
    cfg = (triton / "fmnist_ov" / "config.pbtxt").read_text()
    assert 'backend: "openvino"' in cfg and (triton / "fmnist_ov" / "1" / "model.xml").is_file()
    import shutil

    shutil.copytree(run, tmp_path / "again")
    assert main(["compare", str(run), str(tmp_path / "again"),
                 *_sets(f"data.root={fmnist_dir}", *GATE)]) == 0
    c = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert c["outcome"] == "pass" and c["accuracy"]["delta_pt"] == 0.0


@pytest.mark.slow
def test_register_token_config_runs_end_to_end(tmp_path, fmnist_dir):
    """`vitrim run configs/fmnist_reg_cpu.yaml`: a ViT with 4 register tokens is searched, sliced (registers kept
    with the embedding), fine-tuned, exported and gated."""
    kwargs = ("model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, "
              "num_heads: 2, mlp_ratio: 2.0, reg_tokens: 4, class_token: false, global_pool: avg, "
              "no_embed_class: true}")
    run = tmp_path / "run"
    assert main(["run", "configs/fmnist_reg_cpu.yaml",
                 *_sets(f"data.root={fmnist_dir}", f"out_dir={run}", f"cache_dir={tmp_path / 'cache'}", kwargs,
                        "search.measured_rounds=1")]) == 0
    m = verify_manifest(run)
    assert m["parity"]["passed"]
    plan = json.loads(RunDir(run).plan.read_text())
    assert plan["spec"]["reg_tokens"] == 4
    s = json.loads(RunDir(run).summary.read_text())
    assert s["student"]["params"] < s["teacher"]["params"]
