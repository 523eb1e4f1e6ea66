"""Token merging (issue 15): the merge operator, plans with merges, static ONNX, gated == sliced."""
import json

import numpy as np
import onnx
import pytest
import timm
import torch

from vitrim.export.onnx import export_onnx
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.pipeline.core.compact import CompactViT, TokenMerge
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.slicing import slice_model
from vitrim.pipeline.search import attach_gates, detach_gates, masks_from_plan
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


def _merge_f64(m: TokenMerge, x: torch.Tensor) -> torch.Tensor:
    """The merge's definition in float64: softmax(sqrt(mean(t**2))) weights over each window, pad slots excluded."""
    P, (h, w), (sh, sw), (oh, ow) = m.num_prefix, m.grid, m.window, m.out_grid
    x = x.double()
    B, _, E = x.shape
    t = torch.nn.functional.pad(x[:, P:].reshape(B, h, w, E), (0, 0, 0, m.pad[1], 0, m.pad[0]))
    t = t.reshape(B, oh, sh, ow, sw, E).permute(0, 1, 3, 2, 4, 5).reshape(B, oh * ow, sh * sw, E)
    wgt = torch.softmax(t.pow(2).mean(-1).sqrt() + m.pad_bias.double(), dim=-1)
    return torch.cat([x[:, :P], (t * wgt.unsqueeze(-1)).sum(2)], dim=1)


@pytest.mark.parametrize("scale", [1.0, 300.0, 3e4, 6e4])
def test_merge_is_finite_and_accurate_in_fp16_for_any_finite_activation(scale):
    """Issue 21: the rms squared activations in the graph's dtype, so one channel above 255 overflowed fp16
    (300**2 > 65504): inf, then NaN in TensorRT fp16 engines and torch fp16 targets."""
    g = torch.Generator().manual_seed(0)
    m = TokenMerge((5, 5), "hw", 1)  # odd grid: pad slots (all-zero tokens) too
    x = torch.randn(2, 26, 32, generator=g)
    x[..., 7] = scale * (1 + 0.01 * torch.randn(2, 26, generator=g))  # one large residual channel
    x[:, 3] = 0.0  # an all-zero token
    x = x.half().float()  # exactly representable in fp16, so both runs see the same input
    y16 = TokenMerge((5, 5), "hw", 1).half()(x.half())  # as in a model.half(): its pad_bias in fp16 too
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    want = _merge_f64(m, x)
    # within 4 fp16 ulps of max|x| (measured <= 8e-4 over seeds and scales); fp32 to rounding (measured <= 6e-7)
    assert (y16.double() - want).abs().max() <= 4e-3 * x.abs().max()
    assert (m(x).double() - want).abs().max() <= 1e-5 * x.abs().max()


def test_merge_gradient_is_finite_at_pad_slots_and_zero_tokens():
    """The rms's floors keep sqrt differentiable where a token is all zero (pad slots, dead tokens); elsewhere the
    gradient is the definition's (the max-abs rescaling cancels)."""
    g = torch.Generator().manual_seed(0)
    m = TokenMerge((5, 5), "hw", 0)  # 3x3 windows of 2x2 with pad slots along the last row and column
    x = torch.randn(2, 25, 16, dtype=torch.float64, generator=g)
    x[:, 0] = 0.0
    x.requires_grad_(True)
    m(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    x = torch.randn(1, 25, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,))
