"""The ``uniform`` baseline: one width fraction for every block's heads, QK, V and MLP (units ranked by L1), no skipping.

The fraction is bisected to the budget. It has no per-group scores, so the
closed loop leaves its plan as it is (``correctable = False``).
"""
from __future__ import annotations

import time

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.search.base import SearchContext, SearchResult, Strategy
from vitrim.pipeline.search.cost import Cost
from vitrim.pipeline.search.groups import GroupKey
from vitrim.pipeline.search.saliency import magnitude_scores


def uniform_plan(teacher_state_model: CompactViT, spec: dict, cost: Cost, budget: float, cfg: SearchConfig) -> Plan:
    """One width fraction for every block's heads, QK, V and MLP (units ranked by L1)."""
    mags = magnitude_scores(teacher_state_model)
    fl = Floors.from_config(cfg)
    a = cfg.align

    def width(full: int, f: float, floor: int, align: int) -> int:
        w = max(floor, int(round(full * f / align)) * align)
        return min(full, max(w, align if full >= align else 1))

    def make(f: float) -> Plan:
        blocks = []
        for i in range(spec["depth"]):
            dims = {"heads": width(spec["num_heads"], f, fl.heads, 1), "qk": width(spec["head_dim"], f, fl.qk, a),
                    "v": width(spec["head_dim"], f, fl.v, a), "mlp": width(spec["mlp_hidden"], f, fl.mlp, a)}
            kept = {}
            for dim, n in dims.items():
                sc = mags[GroupKey(dim, i)]
                kept[dim] = sorted(sorted(range(len(sc)), key=lambda u: (-float(sc[u]), u))[:n])
            blocks.append(BlockPlan(True, kept["heads"], kept["qk"], kept["v"], kept["mlp"]))
        return Plan(spec=dict(spec), embed_keep=list(range(spec["embed_dim"])), blocks=blocks)

    if cost.predict(make(0.0)) > budget:
        raise UserError("search", f"uniform width scaling cannot reach the budget {budget:.3f} {cost.unit} "
                        f"(smallest uniform plan: {cost.predict(make(0.0)):.3f})", "raise the budget or use strategy knapsack")
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost.predict(make(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return make(lo)


class Uniform(Strategy):
    """Uniform width scaling: the same kept fraction in every block; the weights are the teacher's."""

    name = "uniform"
    correctable = False

    def search(self, ctx: SearchContext) -> SearchResult:
        cost, budget = ctx.cost, ctx.budget
        start = ctx.log_start()
        history = [{"step": 0, "cost": start, "val_top1": None, "removed": 0, "s": 0.0}]
        plan = uniform_plan(ctx.student, ctx.spec, cost, budget, ctx.cfg)
        history.append({"step": 1, "cost": cost.predict(plan), "val_top1": None, "removed": None, "s": ctx.elapsed()})
        plan.meta = {"strategy": self.name, "budget": budget, "unit": cost.unit, "predicted": cost.predict(plan)}
        return SearchResult(plan, {k: v.clone() for k, v in ctx.student.state_dict().items()}, history, budget,
                            cost.unit, ctx.desc, time.time() - ctx.t0, ctx.cfg)
