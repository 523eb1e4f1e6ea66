"""Token merges as search candidates (issue 15): planted redundancy, KD-measured saliency, run_search."""
import copy

import numpy as np
import pytest
import timm
import torch

from vitrim.export.target import Target
from vitrim.pipeline.core.config import DataConfig, ProfileConfig, SearchConfig
from vitrim.pipeline.core.data import build_splits
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from vitrim.pipeline.stages.distill import make_kd_fn
from vitrim.pipeline.stages.saliency import attach_gates, hessian_scores, merge_scores
from vitrim.pipeline.stages.search import (LatencyCost, candidates, masks_from_plan, merge_options, prune_to,
                                           refill, run_search)
from vitrim.profiling.table import Grid, LatencyTable, token_axis
from tests.conftest import TINY_KW, random_init

# the embedded default's layout: no class token, average pooling (so identical tokens merge losslessly)
POOL_KW = dict(TINY_KW, class_token=False, global_pool="avg")


def hand_made_lut(spec: dict, max_merges: int = 2) -> LatencyTable:
    """A table written down by hand (no timing): every GEMM scales with the token count, attention's
    scores with its square; a merge costs a little per token."""
    g = Grid.for_spec(spec, ProfileConfig(embed_points=2, head_points=0, qk_points=2, v_points=2, mlp_points=3),
                      Floors(), 8, token_axis(spec, 0, max_merges))
    T, E, H, Q, V = np.meshgrid(g.tokens, g.embed, g.heads, g.qk, g.v, indexing="ij")
    attn = 0.01 + 1e-6 * T * E * H * (2 * Q + V) + 1e-6 * T * T * H * (Q + V)
    Tm, Em, M = np.meshgrid(g.tokens, g.embed, g.mlp, indexing="ij")
    mlp = 0.01 + 2e-6 * Tm * Em * M
    Tg, Eg = np.meshgrid(g.tokens, g.embed, indexing="ij")
    merge = np.where(Tg > min(g.tokens), 1e-5 * Tg * Eg, 0.0)
    shell = 0.05 + 1e-3 * np.asarray(g.embed, dtype=np.float64)
    return LatencyTable(Target(batch=64, threads=2).signature(Plan.full(spec).num_tokens), spec, g, attn, mlp, shell,
                        merge=merge)


def identical_tokens(t):
    """Every patch token is the same vector after the stem: no patch content, one position embedding."""
    with torch.no_grad():
        t.patch_embed.proj.weight.zero_()
        t.pos_embed.copy_(t.pos_embed[:, :1].expand_as(t.pos_embed))
    return t


@pytest.fixture(scope="module")
def data(fmnist_dir):
    return build_splits(DataConfig(root=fmnist_dir, train_limit=512, val_limit=128, test_limit=128))


def scored(t, data, plan):
    student, _ = full_size_compact(t)
    gates = attach_gates(student, masks_from_plan(plan))
    student.set_token_merges(plan.merges)
    kd = make_kd_fn(copy.deepcopy(t), 1.0, 2.0)
    batches = [data.train[list(range(i * 64, (i + 1) * 64))] for i in range(2)]
    scores = hessian_scores(student, gates, kd, batches)
    return student, gates, kd, batches, scores


def test_planted_redundancy_makes_the_search_merge_tokens_first(data):
    t = identical_tokens(random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=0, std=0.15))
    spec = describe(t)
    lut = hand_made_lut(spec)
    full = Plan.full(spec)
    student, gates, kd, batches, scores = scored(t, data, full)
    cfg = SearchConfig(prune_tokens=True)
    options = merge_options(full, cfg.max_merges, lut.grid.tokens[0])
    assert len(options) == 2 * 3  # 2 boundaries x 3 types
    groups = candidates(full, scores, Floors(), 8, 1, 8, True, True)
    merges, info = merge_scores(student, gates, kd, batches, {}, options, groups)
    assert info["calibration_groups"] > 0 and info["scale"] > 0
    assert max(abs(v) for v in info["loss_increase"].values()) < 1e-5  # identical tokens: merging loses nothing
    cost = LatencyCost(lut)
    plan, removed = prune_to(full, scores, cost, cost.predict(full) - 1e-6, "knapsack", cfg, 8, merges, lut.grid.tokens[0])
    assert removed[0].dim == "merge" and plan.merges
    # and the merged model computes what the unmerged one does
    x = data.train[list(range(8))][0]
    with torch.no_grad():
        torch.testing.assert_close(slice_model(t, plan)(x), t(x), rtol=1e-4, atol=1e-4)


def test_informative_tokens_make_merges_costly(data):
    """The same model with its patch embedding intact: merging now changes the output, so the loss rises."""
    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=0, std=0.15)
    spec = describe(t)
    full = Plan.full(spec)
    student, gates, kd, batches, scores = scored(t, data, full)
    options = merge_options(full, 2, 1)
    groups = candidates(full, scores, Floors(), 8, 1, 8, True, True)
    merges, info = merge_scores(student, gates, kd, batches, {}, options, groups)
    assert all(v > 0 for v in merges.values())
    assert max(info["loss_increase"].values()) > 1e-3


def test_refill_can_take_a_merge_back():
    spec = describe(timm.create_model("vit_tiny_patch16_224", **POOL_KW))
    lut = hand_made_lut(spec)
    cost = LatencyCost(lut)
    full = Plan.full(spec)
    from vitrim.pipeline.stages.search import Candidate, apply_removal

    c = Candidate(1, "merge", [], 0.1, kind="hw")
    merged = apply_removal(full, 1, "merge", 0, kind="hw")
    assert merged.merges == {1: "hw"}
    back, added = refill(merged, [c], cost, cost.predict(full) + 1e-9)
    assert added == [c] and back.merges == {} and back.tokens is None


def test_run_search_with_token_merges_meets_the_budget_and_slices(data):
    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=1, std=0.15)
    spec = describe(t)
    lut = hand_made_lut(spec)
    student, _ = full_size_compact(t)
    cfg = SearchConfig(steps=2, kd_iters=2, saliency_batches=2, budget_fraction=0.5, lr=1e-4, prune_tokens=True,
                       prune_embed=False)
    res = run_search(copy.deepcopy(t), student, lut, cfg, data.train, data.val, batch_size=64, log=lambda s: None)
    assert lut.predict(res.plan) <= res.budget + 1e-9
    assert "merge_saliency" in res.plan.meta and all("tokens" in r for r in res.log[1:])
    model = slice_model(res.state, res.plan)
    assert model(data.train[list(range(4))][0]).shape == (4, 10)
    # without a token axis the search refuses to merge
    flat = LatencyTable(lut.signature, spec, Grid(**{**lut.grid.__dict__, "tokens": [16]}), lut.attn[-1:], lut.mlp[-1:],
                        lut.shell)
    with pytest.raises(Exception, match="token axis"):
        run_search(copy.deepcopy(t), full_size_compact(t)[0], flat, cfg, data.train, data.val, batch_size=64,
                   log=lambda s: None)


def test_merges_are_priced_like_width_groups_with_the_same_loss_change(data):
    """A gate's saliency is quadratic in the loss change it estimates (NViT's (sum dL/dw * w)^2). With width groups
    planted on that law (saliency = kappa * dL^2, dL measured, spread over > 4x), a merge's score must be what a
    width group with the same loss change scores: kappa * dL_merge^2. So equal loss changes get equal scores, and
    k times the loss change costs k^2 times the score, for merges as for width groups."""
    import dataclasses

    from vitrim.pipeline.stages.saliency import _mean_loss

    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=0, std=0.15)
    full = Plan.full(describe(t))
    student, gates, kd, batches, scores = scored(t, data, full)
    base = _mean_loss(student, kd, batches)

    def group_dl(c):
        g = gates["embed" if c.dim == "embed" else f"b{c.block}.{c.dim}"]
        old = g.clone()
        g[c.units if c.dim != "block" else slice(None)] = 0
        d = _mean_loss(student, kd, batches) - base
        g.copy_(old)
        return d

    def merge_dl(i, kind):
        student.set_token_merges({i: kind})
        d = _mean_loss(student, kd, batches) - base
        student.set_token_merges({})
        return d

    kappa = 3.0
    groups = [(c, group_dl(c)) for c in candidates(full, scores, Floors(), 8, 1, 8, True, True)]
    planted = [dataclasses.replace(c, saliency=kappa * d * d) for c, d in groups if d > 1e-3]
    dls = [d for _, d in groups if d > 1e-3]
    assert len(planted) >= 4 and max(dls) > 4 * min(dls)  # a spread a linear map cannot follow
    options = merge_options(full, 2, 1)
    merges, info = merge_scores(student, gates, kd, batches, {}, options, planted)
    dl = {o: merge_dl(*o) for o in options}
    assert max(dl.values()) > 4 * min(dl.values()) > 0
    for o, d in dl.items():  # the saliency a width group with this loss change has
        assert merges[o] == pytest.approx(kappa * d * d, rel=1e-3)
    lo, hi = min(dl, key=dl.get), max(dl, key=dl.get)
    r = dl[hi] / dl[lo]
    assert merges[hi] / merges[lo] == pytest.approx(r * r, rel=1e-3)  # as for two width groups r times apart
