"""docs/timm-coverage.md is what benchmarks/timm_coverage.py generates now, and no timm ViT crashes describe."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _script():
    spec = importlib.util.spec_from_file_location("timm_coverage", ROOT / "benchmarks" / "timm_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_coverage_doc_is_current_and_nothing_crashes():
    mod = _script()
    result = mod.classify()  # every vit_* VisionTransformer, built on the meta device
    crashes = {k: r for k, (s, r) in result.items() if s == "crash"}
    assert not crashes, crashes
    supported = sum(s == "supported" for s, _ in result.values())
    assert supported / sum(s != "unbuildable" for s, _ in result.values()) >= 0.8
    assert (ROOT / "docs" / "timm-coverage.md").read_text() == mod.render(result), \
        "docs/timm-coverage.md is stale: run .venv/bin/python benchmarks/timm_coverage.py"
