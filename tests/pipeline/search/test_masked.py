"""The learned-mask strategies (issue 17) on their common loop (pipeline/search/masked.py): slim (ViT-Slim) and
uvc (UVC), on a tiny model and a real ORT LUT."""
import pytest

from vitrim.pipeline.core.plan import Plan
from tests.pipeline.search.helpers import cfg, kill_head, reachable_fraction, search, teacher


def mcfg(strategy, **kw):
    base = dict(strategy=strategy, mask_iters=30, kd_iters=3, steps=2, budget_fraction=0.6, mask_lr=0.05)
    base.update(kw)
    return cfg(**base)


@pytest.mark.parametrize("strategy", ["slim", "uvc"])
def test_plan_meets_the_budget_and_the_seed_fixes_it(strategy, data, tiny_lut):
    lut, _ = tiny_lut
    f = reachable_fraction(lut, 0.6, skip_blocks=False)
    runs = [search(teacher(seed=3), lut, data, mcfg(strategy, budget_fraction=f, steps=4)) for _ in range(2)]
    for r in runs:
        assert lut.predict(r.plan) <= r.budget + 1e-9
        assert r.budget == pytest.approx(f * lut.predict(Plan.full(lut.spec)))
        assert r.plan.meta["strategy"] == strategy and r.log[-1]["val_top1"] is not None
    assert runs[0].plan.to_dict() == runs[1].plan.to_dict()
    if strategy == "uvc":  # the soft-versus-realised gap is reported
        g = runs[0].plan.meta["uvc"]
        assert g["soft"] > 0 and g["realised"] > 0 and "gap_pct" in g
    else:  # slim's masks stay in [0, 1], moved, and the l1 term falls over training
        recs = [h for h in runs[0].log if "l1" in h]
        assert len(recs) == 4
        assert all(0.0 <= h["mask_min"] <= h["mask_max"] <= 1.0 for h in recs)
        assert recs[-1]["l1"] < recs[0]["l1"] and recs[0]["mask_min"] < 1.0


@pytest.mark.parametrize("strategy", ["slim", "uvc"])
def test_planted_dead_head_is_removed(strategy, data, planted_lut):
    lut, _ = planted_lut
    r = search(kill_head(teacher(seed=5)), lut, data, mcfg(strategy, budget_fraction=reachable_fraction(lut, 0.8, False),
                                                         prune_blocks=False))
    b0 = r.plan.blocks[0]
    assert b0.keep and 1 not in b0.heads
