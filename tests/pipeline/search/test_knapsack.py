"""The stepwise search and its strategies (pipeline/search/knapsack.py): knapsack, nvit, magnitude; token merges."""
import copy

import pytest
import timm
import torch

from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from vitrim.pipeline.search import LatencyCost, candidates, merge_options, merge_scores, prune_to, run_search
from vitrim.profiling.table import Grid, LatencyTable
from tests.conftest import random_init
from tests.pipeline.search.helpers import (POOL_KW, cfg, check_plan, identical_tokens, reachable_fraction, scored,
                                           search, teacher, token_lut)


@pytest.mark.parametrize("strategy", ["knapsack", "nvit", "magnitude"])
def test_search_meets_budget_floors_alignment(data, tiny_lut, strategy):
    lut, _ = tiny_lut
    frac = reachable_fraction(lut, {"magnitude": 0.8}.get(strategy, 0.55), skip_blocks=strategy != "magnitude")
    res = search(teacher(seed=2), lut, data, cfg(strategy=strategy, budget_fraction=frac))
    check_plan(res, lut, frac)
    if strategy == "magnitude":  # width pruning only, whatever search.prune_blocks says
        assert all(b.keep for b in res.plan.blocks) and res.config.prune_blocks is False


def test_same_seed_same_plan(data, tiny_lut):
    lut, _ = tiny_lut
    plans = [search(teacher(seed=3), lut, data, cfg()).plan for _ in range(2)]
    assert plans[0].to_dict() == plans[1].to_dict()


def test_planted_redundancy_makes_the_search_merge_tokens_first(data):
    t = identical_tokens(random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=0, std=0.15))
    spec = describe(t)
    lut = token_lut(spec)
    full = Plan.full(spec)
    student, gates, kd, batches, scores = scored(t, data, full)
    c = SearchConfig(prune_tokens=True)
    options = merge_options(full, c.max_merges, lut.grid.tokens[0])
    assert len(options) == 2 * 3  # 2 boundaries x 3 types
    groups = candidates(full, scores, Floors(), 8, 1, 8, True, True)
    merges, info = merge_scores(student, gates, kd, batches, {}, options, groups)
    assert info["calibration_groups"] > 0 and info["scale"] > 0
    assert max(abs(v) for v in info["loss_increase"].values()) < 1e-5  # identical tokens: merging loses nothing
    cost = LatencyCost(lut)
    plan, removed = prune_to(full, scores, cost, cost.predict(full) - 1e-6, c, 8, merges, lut.grid.tokens[0])
    assert removed[0].dim == "merge" and plan.merges
    # and the merged model computes what the unmerged one does
    x = data.train[list(range(8))][0]
    with torch.no_grad():
        torch.testing.assert_close(slice_model(t, plan)(x), t(x), rtol=1e-4, atol=1e-4)


def test_run_search_with_token_merges_meets_the_budget_and_slices(data):
    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=1, std=0.15)
    spec = describe(t)
    lut = token_lut(spec)
    student, _ = full_size_compact(t)
    c = SearchConfig(steps=2, kd_iters=2, saliency_batches=2, budget_fraction=0.5, lr=1e-4, prune_tokens=True,
                     prune_embed=False)
    res = run_search(copy.deepcopy(t), student, lut, c, data.train, data.val, batch_size=64, log=lambda s: None)
    assert lut.predict(res.plan) <= res.budget + 1e-9
    assert "merge_saliency" in res.plan.meta and all("tokens" in r for r in res.log[1:])
    model = slice_model(res.state, res.plan)
    assert model(data.train[list(range(4))][0]).shape == (4, 10)
    # without a token axis the search refuses to merge
    flat = LatencyTable(lut.signature, spec, Grid(**{**lut.grid.__dict__, "tokens": [16]}), lut.attn[-1:], lut.mlp[-1:],
                        lut.shell)
    with pytest.raises(Exception, match="token axis"):
        run_search(copy.deepcopy(t), full_size_compact(t)[0], flat, c, data.train, data.val, batch_size=64,
                   log=lambda s: None)


def test_fixed_merges_stay_in_the_plan_and_the_widths_meet_the_budget(data):
    """search.merges (the benchmark's forced-merge row): the merge is in the plan from the start and in the result,
    the widths are searched to the budget with it in place, and no other merge is searched (prune_tokens off)."""
    from vitrim.pipeline.core.errors import UserError

    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=1, std=0.15)
    spec = describe(t)
    lut = token_lut(spec)
    c = SearchConfig(steps=2, kd_iters=2, saliency_batches=2, budget_fraction=0.5, lr=1e-4, prune_embed=False,
                     merges=[{"block": 1, "type": "hw"}])
    res = run_search(copy.deepcopy(t), full_size_compact(t)[0], lut, c, data.train, data.val, batch_size=64,
                     log=lambda s: None)
    assert res.plan.merges == {1: "hw"} and lut.predict(res.plan) <= res.budget + 1e-9
    assert any(len(b.mlp) < spec["mlp_hidden"] or len(b.heads) < spec["num_heads"] for b in res.plan.blocks)
    assert slice_model(res.state, res.plan)(data.train[list(range(4))][0]).shape == (4, 10)
    for bad, word in (([{"block": 5, "type": "hw"}], r"search\.merges\[0\].*block 5"),
                      ([{"block": 1, "type": "hw"}, {"block": 1, "type": "w"}], "two token merges")):
        with pytest.raises(UserError, match=word):
            run_search(copy.deepcopy(t), full_size_compact(t)[0], lut, SearchConfig(merges=bad), data.train, data.val,
                       batch_size=64, log=lambda s: None)
    # a side of 1 halved: on a depth-3 teacher, h, h, h takes 4x4 to 2x4 to 1x4, and the third is impossible
    from vitrim.pipeline.search import fixed_merge_plan

    deep = describe(timm.create_model("vit_tiny_patch16_224", **dict(POOL_KW, depth=3)))
    hh = [{"block": i, "type": "h"} for i in range(3)]
    assert fixed_merge_plan(deep, SearchConfig(merges=hh[:2])).block_grids() == [(2, 4), (1, 4), (1, 4)]
    with pytest.raises(UserError, match=r"search\.merges\[2\].*1x4"):
        fixed_merge_plan(deep, SearchConfig(merges=hh))


def test_step_epochs_fine_tune_between_pruning_steps(data, tiny_lut):
    """search.step_epochs (NViT's prune-finetune iterations): that many epochs of KD steps after every pruning step
    but the last, which keeps search.kd_iters (the fine-tune follows it)."""
    from vitrim.pipeline.search import SearchContext

    lut, _ = tiny_lut
    t = teacher(seed=3)
    ctx = SearchContext.build(cfg(step_epochs=0.5, kd_iters=3), t, full_size_compact(t)[0], lut, data.train, data.val,
                              batch_size=64)
    assert ctx.adapt_iters(last=False) == round(0.5 * len(data.train) / 64) > 3
    assert ctx.adapt_iters(last=True) == 3
    assert SearchContext.build(cfg(kd_iters=3), t, full_size_compact(t)[0], lut, data.train, data.val,
                               batch_size=64).adapt_iters(last=False) == 3


def test_a_search_continues_from_an_earlier_plan_and_its_weights(data, tiny_lut):
    """A progressive curve (search.start_from): the steps fall from the earlier plan's cost to the new budget, and
    the plan only loses units of the earlier one; a strategy that cannot continue a plan refuses (exit 2)."""
    from vitrim.pipeline.core.errors import UserError

    lut, _ = tiny_lut
    lo = reachable_fraction(lut, 0.5, skip_blocks=True)
    hi = max(0.8, round(lo + 0.5 * (1 - lo), 3))
    t = teacher(seed=2)
    a = search(t, lut, data, cfg(budget_fraction=hi, refill=False))
    student, _ = full_size_compact(t)
    student.load_state_dict(a.state)
    lines = []
    b = run_search(t, student, lut, cfg(budget_fraction=lo), data.train, data.val, batch_size=64,
                   log=lines.append, start=a.plan)
    check_plan(b, lut, lo)
    assert any("continuing from an earlier plan" in ln for ln in lines)
    assert b.log[0]["cost"] == pytest.approx(a.log[-1]["cost"]) and a.log[0]["cost"] > a.log[-1]["cost"]
    assert set(b.plan.embed_keep) <= set(a.plan.embed_keep)
    for ba, bb in zip(a.plan.blocks, b.plan.blocks):
        assert ba.keep or not bb.keep
        if bb.keep:
            assert all(set(getattr(bb, d)) <= set(getattr(ba, d)) for d in ("heads", "qk", "v", "mlp"))
    with pytest.raises(UserError, match="cannot start from an earlier plan"):
        run_search(t, full_size_compact(t)[0], lut, cfg(strategy="uniform", budget_fraction=lo), data.train,
                   data.val, batch_size=64, log=lambda m: None, start=a.plan)
