"""Cost models and budgets (pipeline/search/cost.py)."""
import pytest

from vitrim.pipeline.core.config import DEFAULT_BUDGET_FRACTION, SearchConfig, pct
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search import (EMBED, GroupKey, LatencyCost, MacsCost, ParamsCost, apply_removal,
                                    is_latency_budget, resolve_budget)
from tests.pipeline.search.helpers import cfg, search, teacher


def test_flops_budget(data, tiny_lut):
    lut, _ = tiny_lut
    res = search(teacher(seed=4), lut, data, cfg(budget_fraction=None, flops_fraction=0.5))
    assert res.plan.macs() <= 0.5 * Plan.full(lut.spec).macs() + 1


def test_budgets_resolve_to_their_cost_model(tiny_lut):
    lut, _ = tiny_lut
    full = Plan.full(lut.spec)
    cost, budget, _ = resolve_budget(SearchConfig(params_fraction=0.5), lut)
    assert isinstance(cost, ParamsCost) and budget == pytest.approx(0.5 * full.num_params() / 1e6)
    cost, budget, _ = resolve_budget(SearchConfig(flops_fraction=0.4), lut)
    assert isinstance(cost, MacsCost) and budget == pytest.approx(0.4 * full.macs() / 1e6)
    cost, budget, desc = resolve_budget(SearchConfig(), lut)  # no budget at all: the config's default fraction
    assert isinstance(cost, LatencyCost) and budget == pytest.approx(DEFAULT_BUDGET_FRACTION * lut.predict(full))
    assert resolve_budget(SearchConfig(budget_ms=1.5), lut)[1:] == (1.5, "1.500 ms")
    # a fraction is described with the digits it has (9.5% used to print as "10%")
    assert resolve_budget(SearchConfig(budget_fraction=0.095), lut)[2] == "9.5% of the teacher's predicted latency"
    assert [pct(f) for f in (0.45, 0.025, 0.03, 1.0)] == ["45%", "2.5%", "3%", "100%"]  # a tolerance too
    assert is_latency_budget(SearchConfig(budget_ms=1.5)) and not is_latency_budget(SearchConfig(flops_fraction=0.4))


def test_saved_is_what_the_removal_takes_off(tiny_lut):
    """A cost's saving of a group is its prediction before minus after the removal (MACs: exactly)."""
    lut, _ = tiny_lut
    full, macs = Plan.full(lut.spec), MacsCost()
    for key, n in ((GroupKey("mlp", 0), 8), (GroupKey("heads", 1), 1), (GroupKey("block", 1), 1), (EMBED, 8)):
        assert macs.saved(full, key, n) == pytest.approx(macs.predict(full) - macs.predict(apply_removal(full, key, n)))
        assert macs.saved(full, key, n) > 0
    assert LatencyCost(lut).saved(full, GroupKey("block", 1), 1) > 0  # a whole block costs real time
