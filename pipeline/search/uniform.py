"""The ``uniform`` baseline: one width fraction for every block's heads, QK, V and MLP (units ranked by L1), no skipping.

The fraction is bisected to the budget. It has no per-group scores, so the
closed loop leaves its plan as it is (``correctable = False``).
"""
from __future__ import annotations

from typing import Callable, Optional

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.errors import UnreachableBudget
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.search.base import SearchContext, SearchResult, Strategy
from vitrim.pipeline.search.cost import Cost
from vitrim.pipeline.search.groups import EMBED, GroupKey
from vitrim.pipeline.search.saliency import magnitude_scores


def scaled_width(full: int, f: float, floor: int, align: int) -> int:
    """``f`` of ``full`` units, aligned, at least ``floor`` (and one alignment step), at most ``full``."""
    w = max(floor, int(round(full * f / align)) * align)
    return min(full, max(w, align if full >= align else 1))


def scaled_plan(mags: dict, spec: dict, cfg: SearchConfig, f: float, blocks: Optional[list[int]] = None,
                embed: Optional[int] = None) -> Plan:
    """The fraction ``f`` of every kept block's heads, QK, V and MLP units (the largest by L1, ``mags``); the blocks
    ``blocks`` kept (default all), the ``embed`` largest embedding channels (default all)."""
    fl, a = Floors.from_config(cfg), cfg.align
    kept_blocks = set(range(spec["depth"]) if blocks is None else blocks)

    def top(key: GroupKey, n: int) -> list[int]:
        sc = mags[key]
        return sorted(sorted(range(len(sc)), key=lambda u: (-float(sc[u]), u))[:n])

    out = []
    for i in range(spec["depth"]):
        if i not in kept_blocks:
            out.append(BlockPlan(False))
            continue
        dims = {"heads": scaled_width(spec["num_heads"], f, fl.heads, 1),
                "qk": scaled_width(spec["head_dim"], f, fl.qk, a), "v": scaled_width(spec["head_dim"], f, fl.v, a),
                "mlp": scaled_width(spec["mlp_hidden"], f, fl.mlp, a)}
        kept = {dim: top(GroupKey(dim, i), n) for dim, n in dims.items()}
        out.append(BlockPlan(True, kept["heads"], kept["qk"], kept["v"], kept["mlp"]))
    embed_keep = list(range(spec["embed_dim"])) if embed is None else top(EMBED, embed)
    return Plan(spec=dict(spec), embed_keep=embed_keep, blocks=out)


def bisect_scale(make: Callable[[float], Plan], cost: Cost, budget: float, what: str, fix: str
                 ) -> tuple[Plan, float]:
    """The plan ``make(f)`` with the largest ``f`` in [0, 1] under ``budget`` (its cost grows with ``f``), and ``f``.
    An UnreachableBudget naming ``what`` (the scaling) when even ``make(0)`` is over the budget."""
    if cost.predict(make(0.0)) > budget:
        raise UnreachableBudget(f"{what} cannot reach the budget {budget:.3f} {cost.unit} (its smallest plan: "
                                f"{cost.predict(make(0.0)):.3f})", fix)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost.predict(make(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return make(lo), lo


def uniform_plan(teacher_state_model: CompactViT, spec: dict, cost: Cost, budget: float, cfg: SearchConfig
                 ) -> tuple[Plan, float]:
    """One width fraction for every block's heads, QK, V and MLP (units ranked by L1), and the fraction."""
    mags = magnitude_scores(teacher_state_model)
    return bisect_scale(lambda f: scaled_plan(mags, spec, cfg, f), cost, budget, "uniform width scaling",
                        "raise the budget or use strategy knapsack (or compound, which skips blocks)")


class Uniform(Strategy):
    """Uniform width scaling: the same kept fraction in every block; the weights are the teacher's."""

    name = "uniform"
    correctable = False

    def plan(self, ctx: SearchContext) -> tuple[Plan, dict]:
        """The plan under the budget and what it was scaled by (the kept fraction)."""
        plan, f = uniform_plan(ctx.student, ctx.spec, ctx.cost, ctx.budget, ctx.cfg)
        return plan, {"width": round(f, 4)}

    def search(self, ctx: SearchContext) -> SearchResult:
        history = [{"step": 0, "cost": ctx.log_start(), "val_top1": None, "removed": 0, "s": 0.0}]
        plan, scale = self.plan(ctx)
        history.append({"step": 1, "cost": ctx.cost.predict(plan), "val_top1": None, "removed": None,
                        "s": ctx.elapsed(), **scale})
        ctx.log(f"[search] {self.name}: {', '.join(f'{k} {v:.3f}' for k, v in scale.items())}, "
                f"{sum(b.keep for b in plan.blocks)} blocks kept, {ctx.cost.predict(plan):.3f} {ctx.cost.unit}")
        return ctx.result(plan, history, **scale)  # the teacher's weights: nothing was adapted
