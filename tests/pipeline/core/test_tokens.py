"""Token merging (issue 15): the merge operator, plans with merges, static ONNX, gated == sliced."""
import json

import numpy as np
import onnx
import pytest
import timm
import torch

from vitrim.export.onnx import export_onnx
from vitrim.export.runners import OrtCpuRunner
from vitrim.pipeline.core.compact import CompactViT, TokenMerge
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.slicing import slice_model
from vitrim.pipeline.stages.saliency import attach_gates, detach_gates
from vitrim.pipeline.stages.search import masks_from_plan
from tests.conftest import TINY_KW, random_init

# 35 px / 7 = a 5x5 grid (odd sides), with a class token, for the odd-grid cases
ODD_KW = dict(TINY_KW, img_size=35, class_token=True, global_pool="token")


def spec_of(**kw):
    return describe(random_init(timm.create_model("vit_tiny_patch16_224", **kw)))


@pytest.mark.parametrize("grid,kind,out", [((4, 4), "w", (4, 2)), ((4, 4), "h", (2, 4)), ((4, 4), "hw", (2, 2)),
                                           ((5, 5), "hw", (3, 3)), ((5, 3), "w", (5, 2)), ((3, 1), "h", (2, 1))])
def test_merge_keeps_a_row_major_grid_and_weights_neighbours(grid, kind, out):
    h, w = grid
    m = TokenMerge(grid, kind, num_prefix=1)
    x = torch.randn(2, 1 + h * w, 8)
    y = m(x)
    assert m.out_grid == out and y.shape == (2, 1 + out[0] * out[1], 8)
    assert torch.equal(y[:, 0], x[:, 0])  # the class token passes through untouched
    sh, sw = {"w": (1, 2), "h": (2, 1), "hw": (2, 2)}[kind]
    t = x[:, 1:].reshape(2, h, w, 8)
    for r in range(out[0]):
        for c in range(out[1]):  # each output token: the softmax(rms)-weighted mean of its window's real tokens
            win = t[:, r * sh:(r + 1) * sh, c * sw:(c + 1) * sw].reshape(2, -1, 8)
            wgt = torch.softmax(win.pow(2).mean(-1).sqrt(), dim=-1)
            want = (win * wgt.unsqueeze(-1)).sum(1)
            torch.testing.assert_close(y[:, 1 + r * out[1] + c], want, rtol=1e-5, atol=1e-6)


def test_identical_tokens_merge_to_the_same_token():
    x = torch.randn(1, 1, 8).expand(3, 16, 8)
    torch.testing.assert_close(TokenMerge((4, 4), "hw", 0)(x), x[:, :4], rtol=1e-6, atol=1e-6)


def test_plan_validation_refuses_impossible_merges():
    spec = spec_of(**TINY_KW)  # 4x4 grid
    p = Plan.full(spec).set_merges({0: "hw", 1: "hw"})
    p.validate()
    assert p.block_grids() == [(2, 2), (1, 1)] and p.block_tokens() == [5, 2]  # + the class token
    for merges, msg in [({5: "w"}, "not a block"), ({0: "x"}, "type")]:
        with pytest.raises(UserError, match=msg):
            Plan.full(spec).set_merges(merges).validate()
    bad = Plan.full(spec).to_dict()
    bad["tokens"] = {"merges": [{"block": 0, "type": "hw"}, {"block": 1, "type": "hw"}]}
    Plan.from_dict(bad)
    bad["tokens"]["merges"].append({"block": 1, "type": "w"})
    with pytest.raises(UserError, match="two token merges"):
        Plan.from_dict(bad)
    small = Plan.full(spec_of(**dict(TINY_KW, img_size=14))).to_dict()  # a 2x2 grid
    small["tokens"] = {"merges": [{"block": 0, "type": "hw"}, {"block": 1, "type": "w"}]}
    with pytest.raises(UserError, match="impossible: the grid there is 1x1"):
        Plan.from_dict(small)
    lied = Plan.full(spec).set_merges({1: "w"}).to_dict()
    lied["tokens"]["grids"][0] = [4, 2]
    with pytest.raises(UserError, match="grids do not follow"):
        Plan.from_dict(lied)


def test_plan_with_merges_round_trips_and_counts_fewer_macs():
    spec = spec_of(**TINY_KW)
    p = Plan.full(spec).set_merges({1: "w"})
    d = json.loads(json.dumps(p.to_dict()))
    assert d["tokens"]["grids"] == [[4, 4], [4, 2]]
    q = Plan.from_dict(d)
    assert q.merges == {1: "w"} and q.block_tokens() == [17, 9]
    assert q.macs() < Plan.full(spec).macs() and q.num_params() == Plan.full(spec).num_params()


@pytest.mark.parametrize("kw,merges", [(TINY_KW, {1: "hw"}), (TINY_KW, {0: "w", 1: "h"}), (ODD_KW, {0: "hw"}),
                                       (ODD_KW, {1: "w"})])
def test_gated_full_model_with_merges_equals_the_sliced_model(kw, merges):
    """Search gates (embedding included) plus trial merges compute what the sliced plan computes."""
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **kw), seed=1, std=0.2)
    spec = describe(teacher)
    plan = Plan.full(spec).set_merges(merges)
    plan.embed_keep = plan.embed_keep[:24]
    plan.blocks[0].mlp = plan.blocks[0].mlp[:40]
    plan.validate()
    x = torch.randn(3, 1, *spec["img_size"])
    sliced = slice_model(teacher, plan)
    full = slice_model(teacher, Plan.full(spec))
    attach_gates(full, masks_from_plan(plan))
    full.set_token_merges(plan.merges)
    with torch.no_grad():
        torch.testing.assert_close(full(x), sliced(x), rtol=1e-5, atol=1e-5)
    detach_gates(full)
    full.set_token_merges({})
    with torch.no_grad():  # no merges left behind: the keep-all model is the teacher again
        torch.testing.assert_close(full(x), teacher(x), rtol=0, atol=0)


@pytest.mark.parametrize("kw,merges", [(TINY_KW, {0: "w"}), (TINY_KW, {0: "h"}), (TINY_KW, {1: "hw"}),
                                       (ODD_KW, {0: "hw", 1: "w"})])
def test_merged_model_exports_static_onnx_and_ort_matches_torch(tmp_path, kw, merges):
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **kw), seed=2, std=0.2)
    spec = describe(teacher)
    plan = Plan.full(spec).set_merges(merges).validate()
    model = slice_model(teacher, plan)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, *spec["img_size"]))
    g = onnx.load(str(path)).graph
    ops = {n.op_type for n in g.node}
    assert not ops & {"ScatterND", "ScatterElements", "TopK", "NonZero", "Unique", "Loop", "If"}, ops
    assert "ReduceSum" in ops and "Softmax" in ops
    x = np.random.default_rng(0).standard_normal((5, 1, *spec["img_size"])).astype(np.float32)
    with OrtCpuRunner(path, threads=1) as r:
        got = r.infer(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("grid,kind,prefix", [((4, 4), "w", 0), ((4, 4), "h", 1), ((5, 5), "hw", 1), ((5, 3), "w", 2)])
def test_merge_alone_exports_with_static_shapes(tmp_path, grid, kind, prefix):
    """Every intermediate of the merge has fixed dims apart from the batch (no data-dependent shapes)."""
    m = TokenMerge(grid, kind, prefix)
    path = tmp_path / "merge.onnx"
    export_onnx(m, path, (prefix + grid[0] * grid[1], 16))
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True).graph
    values = list(inferred.value_info) + list(inferred.output)
    assert len(values) > 5
    for vi in values:
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims[1:]), (vi.name, dims)
    x = np.random.default_rng(1).standard_normal((3, prefix + grid[0] * grid[1], 16)).astype(np.float32)
    with OrtCpuRunner(path, threads=1) as r:
        got = r.infer(x)
    with torch.no_grad():
        assert np.abs(got - m(torch.from_numpy(x)).numpy()).max() <= 1e-5


def test_compact_refuses_impossible_merges():
    m = CompactViT(Plan.full(spec_of(**dict(TINY_KW, img_size=14))))  # a 2x2 grid
    with pytest.raises(UserError, match="impossible"):
        m.set_token_merges({0: "hw", 1: "h"})
