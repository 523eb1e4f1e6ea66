"""The uniform width-scaling baseline (pipeline/search/uniform.py)."""
import pytest

from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Floors
from vitrim.pipeline.search import floor_plan
from tests.pipeline.search.helpers import cfg, check_plan, reachable_fraction, search, teacher


def test_uniform_meets_budget_floors_alignment(data, tiny_lut):
    lut, _ = tiny_lut
    frac = reachable_fraction(lut, 0.85, skip_blocks=False, prune_embed=False)  # uniform keeps the embedding
    res = search(teacher(seed=2), lut, data, cfg(strategy="uniform", budget_fraction=frac))
    check_plan(res, lut, frac)
    plan = res.plan
    assert all(b.keep for b in plan.blocks) and plan.embed_dim == lut.spec["embed_dim"]
    assert len({b.dims for b in plan.blocks}) == 1  # one width for every block


def test_uniform_refuses_unreachable_budget(data, tiny_lut):
    lut, _ = tiny_lut
    # a budget between the global floor (one block, smallest embed) and the smallest uniform plan
    # (every block at its floors, full embed), taken from the measured LUT so timing noise can't move it
    fl = Floors()
    lower = lut.predict(floor_plan(lut.spec, fl, lut.grid.embed[0], 1, 8))
    uniform_min = lut.predict(floor_plan(lut.spec, fl, lut.spec["embed_dim"], lut.spec["depth"], 8))
    assert lower < uniform_min
    with pytest.raises(UserError, match="uniform width scaling cannot reach"):
        search(teacher(), lut, data, cfg(strategy="uniform", budget_fraction=None, budget_ms=(lower + uniform_min) / 2))
