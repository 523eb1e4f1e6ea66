"""Engines and the profiling export cache."""

import pytest
import torch


@pytest.fixture(scope="module")
def spec(tiny_spec):
    return tiny_spec


def test_export_cache_reuses_only_identical_modules(tmp_path, spec):
    """Profiling re-exports nothing it exported before in the process, and nothing else is mistaken for it."""
    from vitrim.export.engine import _module_key, export_cached
    from vitrim.profiling.micro import make_part

    a, b = make_part("attn", spec, 32, 2, 16, 16, 64), make_part("attn", spec, 32, 2, 16, 16, 64)
    assert _module_key(a, (17, 32)) == _module_key(b, (17, 32))
    assert _module_key(a, (17, 32)) != _module_key(a, (9, 32))  # another token count
    other = make_part("attn", dict(spec, scale_head_dim=8), 32, 2, 16, 16, 64)  # same weights, another scale
    assert _module_key(other, (17, 32)) != _module_key(a, (17, 32))
    with torch.no_grad():
        b.blk.attn.proj.bias[0] += 1.0
    assert _module_key(b, (17, 32)) != _module_key(a, (17, 32))
    p1 = export_cached(a, tmp_path / "a.onnx", (17, 32))
    p2 = export_cached(make_part("attn", spec, 32, 2, 16, 16, 64), tmp_path / "a2.onnx", (17, 32))
    assert p1.read_bytes() == p2.read_bytes()
