"""prune_to and refill (pipeline/search/greedy.py) on planted and measured costs."""
import pytest
import timm
import torch

from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search import (EMBED, Candidate, Cost, GroupKey, LatencyCost, apply_removal, knapsack_ratio,
                                    nvit_penalty, prune_to, refill, strategy)
from tests.pipeline.search.helpers import POOL_KW, cfg, token_lut


def test_refill_fills_the_budget_without_exceeding_it(tiny_lut):
    lut, _ = tiny_lut
    cost = LatencyCost(lut)
    full = Plan.full(lut.spec)
    b1 = full.blocks[1]
    snap = type(b1)(True, list(b1.heads), list(b1.qk), list(b1.v), list(b1.mlp))
    block1, mlp0 = GroupKey("block", 1), GroupKey("mlp", 0)
    removed = [Candidate(block1, [], 1.0, snapshot=snap), Candidate(mlp0, list(range(56, 64)), 0.5)]
    plan = apply_removal(apply_removal(full, block1, 1), mlp0, 8, list(range(56, 64)))
    # the budget fits the MLP group back (whatever its measured cost) but not the block
    budget = max(cost.predict(plan), cost.predict(apply_removal(full, block1, 1))) + 1e-9
    assert cost.predict(full) > budget  # a whole block costs real time in the measured LUT
    refilled, added = refill(plan, removed, cost, budget)
    assert cost.predict(refilled) <= budget + 1e-12
    assert refilled.blocks[0].mlp == list(range(64))
    assert [c.dim for c in added] == ["mlp"]
    assert not refilled.blocks[1].keep  # the whole block does not fit


def test_refill_can_take_a_merge_back():
    spec = describe(timm.create_model("vit_tiny_patch16_224", **POOL_KW))
    lut = token_lut(spec)
    cost = LatencyCost(lut)
    full = Plan.full(spec)
    key = GroupKey("merge", 1, "hw")
    c = Candidate(key, [], 0.1)
    merged = apply_removal(full, key)
    assert merged.merges == {1: "hw"}
    back, added = refill(merged, [c], cost, cost.predict(full) + 1e-9)
    assert added == [c] and back.merges == {} and back.tokens is None


class PlantedCost(Cost):
    """An additive latency model (ms) whose block-0 QK entry is slightly non-monotone:
    removing QK dims there 'costs' 1e-4 ms, as a noisy LUT entry can."""

    unit = "ms"

    def predict(self, plan: Plan) -> float:
        t = 0.5 + 0.001 * len(plan.embed_keep)
        for i, b in enumerate(plan.blocks):
            if b.keep:
                qk = (-1e-4 / 8 if i == 0 else 0.002) * len(b.qk)
                t += 1.0 + 0.05 * len(b.heads) + qk + 0.002 * len(b.v) + 0.01 * len(b.mlp)
        return t


def planted_scores(spec: dict) -> dict:
    sc = {EMBED: torch.full((spec["embed_dim"],), 10.0)}
    for i in range(spec["depth"]):
        sc[GroupKey("heads", i)] = torch.full((spec["num_heads"],), 50.0)
        sc[GroupKey("qk", i)] = torch.full((spec["head_dim"],), 1e-13 / 8 if i == 0 else 5.0)
        sc[GroupKey("v", i)] = torch.full((spec["head_dim"],), 5.0)
        sc[GroupKey("mlp", i)] = torch.full((spec["mlp_hidden"],), 0.001)  # 0.008 per group of 8
        sc[GroupKey("block", i)] = torch.tensor([100.0])
    return sc


@pytest.mark.parametrize("name,eta", [("knapsack", 1.0), ("nvit", 0.01)])
def test_zero_saving_group_is_never_taken(tiny_spec, name, eta):
    cost, full = PlantedCost(), Plan.full(tiny_spec)
    sc = planted_scores(tiny_spec)
    assert cost.saved(full, GroupKey("qk", 0), 8) < 0 and sc[GroupKey("qk", 0)].sum() < 1e-12  # the planted trap
    target = cost.predict(full) - 0.35  # four or five MLP groups' worth
    c = cfg(eta=eta)
    plan, removed = prune_to(full, sc, cost, target, c, e_min=8, rank=strategy(name)().ranking(c))
    assert cost.predict(plan) <= target
    assert all(c.saved > 0 for c in removed)
    assert not any(c.block == 0 and c.dim == "qk" for c in removed)
    assert plan.blocks[0].qk == list(range(16))
    if name == "knapsack":  # the saliency-100 blocks survive; cheap MLP groups go instead
        assert all(b.keep for b in plan.blocks)
        assert {c.dim for c in removed} == {"mlp"}


def test_nothing_that_saves_time_stops_the_loop(tiny_spec):
    class Flat(Cost):
        unit = "ms"

        def predict(self, plan: Plan) -> float:
            return 1.0

    full = Plan.full(tiny_spec)
    plan, removed = prune_to(full, planted_scores(tiny_spec), Flat(), 0.5, cfg(), e_min=8)
    assert removed == [] and plan.to_dict() == full.to_dict()


def test_nvit_penalty_normalises_once_per_call():
    """NViT's score ``S/mean(S) - eta * saved/mean(saved)``: both means from the first candidates it ranks, kept for
    the rest of the prune_to call (a new ranking per call), unlike the knapsack's plain ratio."""
    first = [Candidate(GroupKey("mlp", 0), [0], 2.0, saved=1.0), Candidate(GroupKey("mlp", 1), [0], 4.0, saved=3.0)]
    rank = nvit_penalty(0.5)
    key = rank(first)
    assert key(first[0]) == pytest.approx(2.0 / 3.0 - 0.5 * 1.0 / 2.0)
    later = [Candidate(GroupKey("v", 0), [0], 30.0, saved=10.0)]
    assert rank(later)(later[0]) == pytest.approx(30.0 / 3.0 - 0.5 * 10.0 / 2.0)  # still the first call's means
    assert nvit_penalty(0.5)(later)(later[0]) == pytest.approx(1.0 - 0.5)  # a fresh ranking normalises anew
    assert knapsack_ratio(first)(first[1]) == pytest.approx(4.0 / 3.0)
