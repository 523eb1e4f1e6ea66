"""The compound-scaling baseline (pipeline/search/compound.py): one fraction for the depth and every width."""
import pytest

from vitrim.pipeline.core.errors import UnreachableBudget
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.slicing import slice_model
from vitrim.pipeline.search import evenly_spaced, floor_plan
from tests.pipeline.search.helpers import cfg, check_plan, search, teacher


def test_evenly_spaced_blocks_keep_the_first_and_the_last():
    assert evenly_spaced(8, 1) == [0]
    assert evenly_spaced(8, 2) == [0, 7]
    assert evenly_spaced(8, 4) == [0, 2, 5, 7]
    assert evenly_spaced(8, 8) == evenly_spaced(8, 11) == list(range(8))
    assert all(len(evenly_spaced(12, n)) == n for n in range(1, 13))  # no two picks collapse


def test_compound_reaches_a_budget_below_every_width_only_plan(data, planted_lut):
    """Between the global floor (one block, the smallest embedding) and the smallest uniform plan (every block at
    its floors): uniform is refused with UnreachableBudget, compound skips a block and meets the budget."""
    lut, _ = planted_lut
    spec = lut.spec
    full = lut.predict(Plan.full(spec))
    lower = lut.predict(floor_plan(spec, Floors(), lut.grid.embed[0], 1, 8))
    uniform_min = lut.predict(floor_plan(spec, Floors(), spec["embed_dim"], spec["depth"], 8))
    assert lower < uniform_min
    frac = round((lower + uniform_min) / 2 / full, 4)
    with pytest.raises(UnreachableBudget, match="uniform width scaling cannot reach"):
        search(teacher(), lut, data, cfg(strategy="uniform", budget_fraction=frac))
    res = search(teacher(), lut, data, cfg(strategy="compound", budget_fraction=frac))
    check_plan(res, lut, frac)
    kept = [b for b in res.plan.blocks if b.keep]
    assert len(kept) < spec["depth"] and res.plan.blocks[0].keep
    assert res.plan.meta["strategy"] == "compound"
    x = data.val[list(range(4))][0]
    assert slice_model(res.state, res.plan)(x).shape == (4, 10)  # the teacher's weights, sliced


def test_compound_keeps_every_block_near_the_teachers_latency(data, planted_lut):
    lut, _ = planted_lut
    res = search(teacher(), lut, data, cfg(strategy="compound", budget_fraction=0.95))
    check_plan(res, lut, 0.95)
    assert all(b.keep for b in res.plan.blocks)
    assert len({b.dims for b in res.plan.blocks}) == 1  # one width for every block


def test_compound_below_its_floor_is_an_unreachable_budget(data, planted_lut):
    lut, _ = planted_lut
    lower = lut.predict(floor_plan(lut.spec, Floors(), lut.grid.embed[0], 1, 8))
    with pytest.raises(UnreachableBudget, match="below the smallest reachable"):
        search(teacher(), lut, data, cfg(strategy="compound", budget_fraction=None, budget_ms=lower * 0.9))


def test_step_epochs_is_refused_where_the_strategy_does_not_prune_in_steps():
    from vitrim.pipeline.core import config
    from vitrim.pipeline.core.errors import UserError
    from vitrim.pipeline.search import STRATEGIES

    assert {n for n, s in STRATEGIES.items() if s.stepwise} == set(config.STEPWISE)
    for name in STRATEGIES:
        c = config.SearchConfig(strategy=name, step_epochs=0.5)
        if name in config.STEPWISE:
            config.validate_search(c)
        else:
            with pytest.raises(UserError, match="step_epochs") as e:
                config.validate_search(c)
            assert not isinstance(e.value, UnreachableBudget)


def test_compound_widens_the_kept_blocks_into_what_the_depth_rounding_leaves(data, planted_lut):
    """The depth moves in whole blocks, so one scale alone stops short of the budget below each depth step (the
    benchmark measured 18% for a 20% target at two budgets); the widths then fill it, never past it."""
    lut, _ = planted_lut
    widened = 0
    for frac in (0.5, 0.6, 0.7, 0.8):
        res = search(teacher(), lut, data, cfg(strategy="compound", budget_fraction=frac))
        check_plan(res, lut, frac)
        meta = res.plan.meta
        assert meta["width"] >= meta["scale"] and res.log[-1]["width"] == meta["width"]
        widened += meta["width"] > meta["scale"]
    assert widened >= 1
