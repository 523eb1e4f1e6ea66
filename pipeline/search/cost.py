"""What a budget is measured in: latency from the measured LUT, or MACs / params for comparison with UVC and ViT-Slim."""
from __future__ import annotations

from vitrim.pipeline.core.config import DEFAULT_BUDGET_FRACTION, SearchConfig, pct
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search.groups import GroupKey, apply_removal


class Cost:
    """What the budget is measured in. ``predict(plan)`` and ``saved(plan, key, n)``."""

    unit = ""

    def predict(self, plan: Plan) -> float:
        raise NotImplementedError

    def saved(self, plan: Plan, key: GroupKey, n: int) -> float:
        """What removing ``n`` units of group ``key`` from ``plan`` saves."""
        return self.predict(plan) - self.predict(apply_removal(plan, key, n))


class LatencyCost(Cost):
    """Milliseconds on the target, from the measured latency table (its marginal saving per group)."""

    unit = "ms"

    def __init__(self, lut):
        self.lut = lut

    def predict(self, plan: Plan) -> float:
        return self.lut.predict(plan)

    def saved(self, plan: Plan, key: GroupKey, n: int) -> float:
        return self.lut.marginal(plan, key.block, key.dim, groups=1, group_size=n if key.dim != "block" else 1,
                                 merge_type=key.type or "hw")


class MacsCost(Cost):
    unit = "MMACs"

    def predict(self, plan: Plan) -> float:
        return plan.macs() / 1e6


class ParamsCost(Cost):
    unit = "Mparams"

    def predict(self, plan: Plan) -> float:
        return plan.num_params() / 1e6


def is_latency_budget(s: SearchConfig) -> bool:
    """Whether the budget is a latency (ms or a fraction of the teacher's), not MACs or params."""
    return s.flops_fraction is None and s.params_fraction is None


def resolve_budget(cfg: SearchConfig, lut) -> tuple[Cost, float, str]:
    """(cost model, budget in its unit, description) of a validated config (one budget at most)."""
    full = Plan.full(lut.spec)
    if cfg.flops_fraction is not None:
        c = MacsCost()
        return c, cfg.flops_fraction * c.predict(full), f"{pct(cfg.flops_fraction)} of the teacher's MACs"
    if cfg.params_fraction is not None:
        c = ParamsCost()
        return c, cfg.params_fraction * c.predict(full), f"{pct(cfg.params_fraction)} of the teacher's params"
    c = LatencyCost(lut)
    if cfg.budget_ms is not None:
        return c, cfg.budget_ms, f"{cfg.budget_ms:.3f} ms"
    frac = DEFAULT_BUDGET_FRACTION if cfg.budget_fraction is None else cfg.budget_fraction
    return c, frac * c.predict(full), f"{pct(frac)} of the teacher's predicted latency"
