"""The registry and run_search (pipeline/search/__init__.py), and what every strategy shares (base.py)."""
import pytest

from vitrim.pipeline.core import config
from vitrim.pipeline.core.errors import UnreachableBudget, UserError
from vitrim.pipeline.search import STRATEGIES, searched_config, strategy
from tests.pipeline.search.helpers import cfg, search, teacher


def test_registry_is_the_configs_list_of_strategies():
    assert set(STRATEGIES) == set(config.STRATEGIES)
    assert all(s.name == name for name, s in STRATEGIES.items())


def test_config_validation_agrees_with_the_strategies_on_token_merges():
    """search.prune_tokens is accepted exactly for the strategies that search merges."""
    for name, s in STRATEGIES.items():
        c = config.SearchConfig(strategy=name, prune_tokens=True)
        if s.merges_tokens:
            config.validate_search(c)
        else:
            with pytest.raises(UserError, match="prune_tokens"):
                config.validate_search(c)


def test_constraints_hold_whatever_the_config_says():
    """A width-only strategy searches (and is corrected) without block pruning even when the config allows it."""
    c = config.SearchConfig(prune_blocks=True)
    for name, s in STRATEGIES.items():
        searched = searched_config(config.SearchConfig(strategy=name, prune_blocks=True))
        assert searched.prune_blocks is s.constraints.get("prune_blocks", True), name
    assert strategy("slim").constraints and strategy("magnitude").constraints and not strategy("knapsack").constraints
    assert searched_config(c) is c  # nothing to change: the same object


def test_two_budgets_in_a_search_config_are_refused(data, tiny_lut):
    lut, _ = tiny_lut
    with pytest.raises(UserError, match=r"search\.budget_ms and search\.budget_fraction"):
        search(teacher(), lut, data, cfg(budget_ms=5.0))
    with pytest.raises(UserError, match=r"search\.align"):
        search(teacher(), lut, data, cfg(align=0))
    with pytest.raises(UserError, match=r"search\.strategy"):
        search(teacher(), lut, data, cfg(strategy="hessian"))


@pytest.mark.parametrize("name", ["knapsack", "uvc"])
def test_impossible_budget_is_refused(data, tiny_lut, name):
    lut, _ = tiny_lut
    with pytest.raises(UnreachableBudget, match="below the smallest reachable"):  # a benchmark's "not reached"
        search(teacher(), lut, data, cfg(strategy=name, budget_fraction=None, budget_ms=1e-4))
