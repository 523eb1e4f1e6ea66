"""The BACKENDS registry: every engine registers, the names and refusals come from it, and each backend builds
and gates an engine (the ones this machine lacks skip, saying what is missing)."""
import numpy as np
import pytest
import timm

from vitrim.export.backends import BACKENDS, get_backend
from vitrim.export.parity import Tolerances, check_parity
from vitrim.export.release import release
from vitrim.export.runners import TorchRunner
from vitrim.export.target import Target, format_targets, machine_targets
from vitrim.pipeline.core.config import ExportConfig
from vitrim.pipeline.core.errors import UserError
from tests.conftest import TINY_KW, random_init


def _batches(n=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, size)) for _ in range(n)]


def test_unknown_backend_is_refused_naming_the_registered_ones():
    with pytest.raises(UserError, match="unknown target.backend 'tpu'") as e:
        get_backend("tpu")
    assert all(name in e.value.fix for name in BACKENDS)


def test_every_config_command_refuses_an_unknown_backend(tmp_path, capsys):
    """The config loader does not list the engines (core sits below export); the CLI asks the registry as it
    loads a config, so even a command that never builds an engine refuses the name, exit 2, naming the choices."""
    from vitrim.pipeline.cli import main

    for cmd in (["eval"], ["train-teacher"], ["profile", "show"], ["run"]):
        assert main([*cmd, "configs/fmnist_cpu.yaml", "--set", "target.backend=tpu"]) == 2, cmd
        err = capsys.readouterr().err
        assert "unknown target.backend 'tpu'" in err and all(n in err for n in BACKENDS), err


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_backend_builds_and_gates_an_engine(name, tmp_path):
    """A tiny ViT released on each backend passes its fp32 gate; a backend this machine cannot run is refused
    with exit 2 before anything is built (and the test skips, saying why)."""
    b = BACKENDS[name]
    t = Target(backend=name, batch=8, threads=1)
    why = b.availability()
    if why is not None:
        with pytest.raises(UserError) as e:
            t.check_available()
        assert e.value.fix  # what to install or where to run
        pytest.skip(f"{name} is not available here: {why}")
    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=5, std=0.2)
    r = release(tmp_path / name, t, _batches(), model=model, warmup=1, repeats=3, log=lambda m: None)
    assert r["parity"]["passed"] and r["engine"] and r["latency"]["median_ms"] > 0
    # the same gate fails the engine of another model: the reference is not the engine
    other = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=6, std=0.2)
    eng_dir = tmp_path / f"{name}-other"
    from vitrim.export.engine import build_engine
    from vitrim.export.onnx import export_onnx

    onnx_path = None if b.from_model else export_onnx(other, tmp_path / "other.onnx", (1, 28, 28))
    eng = build_engine(onnx_path, eng_dir, t, (1, 28, 28), model=other)
    with TorchRunner(model, (1, 28, 28), threads=1) as ref, eng.runner(t) as run:
        rep = check_parity(ref, run, _batches(), Tolerances.for_precision(ExportConfig(), "fp32"), "fp32", 2)
    assert not rep.passed


def test_vitrim_targets_lists_what_runs_here(capsys):
    from vitrim.pipeline.cli import main

    info = machine_targets()
    rows = {r["backend"]: r for r in info["backends"]}
    assert set(rows) == set(BACKENDS) and rows["ort-cpu"]["available"] and "fp32" in rows["ort-cpu"]["precisions"]
    assert set(info["cpu_features"]) >= {"avx2", "avx512_vnni", "avx512_bf16", "amx_bf16"}
    for r in rows.values():
        assert r["available"] == (r["why"] is None) and set(r["precisions"]) <= set(r["offers"])
    ov = rows["openvino"]
    assert ("bf16" in ov["precisions"]) == (ov["available"] and get_backend("openvino").has_bf16())
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_targets(machine_targets()).strip() and "avx512_bf16" in out
    for name in BACKENDS:
        assert f"\n{name} " in out
