"""The closed loop: the LUT steers the search, the engine decides (issue 14; DESIGN.md "Closed loop").

Pure selection on a ``measure(plan) -> (teacher ms, student ms)`` callable (the
stage supplies one that exports and times on the target, interleaved with the
teacher). When the measured ratio misses the requested one by more than
``search.measured_tolerance``, the budget handed to the LUT is rescaled by the
miss (the LUT's error on this plan's ratio is assumed to hold for plans next to
it; once measured plans straddle the request, the budget is interpolated between
them instead, :func:`next_ratio`), the plan is pruned or refilled to it with the search's own selection
(:func:`~vitrim.pipeline.search.greedy.prune_to`,
:func:`~vitrim.pipeline.search.greedy.refill`), and measured again, for at most
``search.measured_rounds`` rounds. Every corrected plan's weights are adapted
with KD before the next correction scores them (the stage's ``adapt``: at 10% of
the teacher a re-pruned plan sliced from unadapted weights scored 37% top-1). Corrections use the configuration the plan
was searched under (:meth:`~vitrim.pipeline.search.base.Strategy.searched_config`:
a width-only ``magnitude`` or ``slim`` plan never loses a block to a
correction), with the scores its strategy gives
(:meth:`~vitrim.pipeline.search.base.Strategy.correction_scores`). The tolerance
is symmetric (``|measured / requested - 1| <= tolerance``); a loop that ends
without meeting it (rounds spent, or a correction that gives a plan already
measured) returns the measured plan closest to the requested ratio (the faster
one on a tie), not the last one, and says it did not converge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vitrim.pipeline.core.config import SearchConfig, pct
from vitrim.pipeline.core.plan import BlockPlan, Plan
from vitrim.pipeline.search.cost import LatencyCost
from vitrim.pipeline.search.greedy import prune_to, refill
from vitrim.pipeline.search.groups import EMBED, WIDTH_DIMS, Candidate, GroupKey, full_widths

Measure = Callable[[Plan], tuple[float, float]]  # plan -> (teacher ms, student ms), one interleaved session


@dataclass
class LoopResult:
    plan: Plan  # the converged plan, else the measured plan closest to the requested ratio
    requested: float  # requested ratio to the teacher (measured)
    rounds: list = field(default_factory=list)
    converged: bool = False
    chosen_round: int = 0  # the round that measured ``plan``
    plans: list = field(default_factory=list)  # every measured plan, by round


def removed_pool(plan: Plan, scores: dict, align: int, per_dim: int = 4) -> list[Candidate]:
    """Groups the plan lacks (against the teacher), most salient first, as refill candidates.

    Only the ``per_dim`` most salient chunks of each (block, dim) are offered:
    a correction moves the plan by a few groups, and the pool stays small.
    """
    s = plan.spec
    out: list[Candidate] = []

    def chunks(missing: list[int], sc, step: int) -> list[list[int]]:
        order = sorted(missing, key=lambda u: (-float(sc[u]), u))
        return [sorted(order[i:i + step]) for i in range(0, len(order), step)][:per_dim]

    miss = [u for u in range(s["embed_dim"]) if u not in set(plan.embed_keep)]
    for units in chunks(miss, scores[EMBED], align):
        out.append(Candidate(EMBED, units, float(sum(scores[EMBED][u] for u in units))))
    full = full_widths(s)
    for i, b in enumerate(plan.blocks):
        if not b.keep:
            snap = BlockPlan(True, *[list(range(full[d])) for d in WIDTH_DIMS])
            key = GroupKey("block", i)
            out.append(Candidate(key, [], float(scores[key].sum()), snapshot=snap))
            continue
        for dim in WIDTH_DIMS:
            have = set(getattr(b, dim))
            key = GroupKey(dim, i)
            sc = scores[key]
            for units in chunks([u for u in range(full[dim]) if u not in have], sc, 1 if dim == "heads" else align):
                out.append(Candidate(key, units, float(sum(sc[u] for u in units))))
    return out


def next_ratio(history: list[tuple[float, float]], requested: float) -> tuple[float, str]:
    """The LUT ratio (to the teacher) to aim the next correction at, from every measured round so far as
    ``(LUT-predicted ratio, measured ratio)`` pairs; returns ``(ratio, rule)``.

    Until the measurements straddle ``requested``, the LUT's error on the last plan's ratio is assumed to
    hold for the plans next to it (``proportional``: ``p * requested / m``). Once one measured plan ran
    faster and one slower than requested, the answer lies between them: the secant through the last two
    rounds when it falls strictly inside that bracket (``secant``), else the straight line between the
    bracket's two ends (``bracketed``). The aim then never leaves the bracket (the plan made for it can
    still land a group's grain below it, and its measurement carries the machine's noise), so the loop
    closes in instead of swinging (at 10% of the teacher the proportional rule alone went +4%, +10%,
    -12%, -2%: the LUT's error there is not the same from one plan to the next). The proportional aim is
    capped at the teacher (1.0)."""
    p, m = history[-1]
    below = [h for h in history if h[1] < requested]
    above = [h for h in history if h[1] > requested]
    if below and above:  # (two rounds at least, and m0 < requested < m1)
        (p0, m0), (p1, m1) = max(below, key=lambda h: h[1]), min(above, key=lambda h: h[1])
        lo, hi = min(p0, p1), max(p0, p1)
        (pa, ma), (pb, mb) = history[-2], history[-1]
        if mb != ma and pb != pa:
            q = pb + (requested - mb) * (pb - pa) / (mb - ma)
            if lo < q < hi:
                return q, "secant"
        return p0 + (requested - m0) * (p1 - p0) / (m1 - m0), "bracketed"
    return min(1.0, p * requested / m), "proportional"


def correct_plan(plan: Plan, lut, scores: dict, cfg: SearchConfig, e_min: int, budget_ms: float) -> Plan:
    """Prune (then refill) or refill ``plan`` to the LUT budget ``budget_ms`` with the search's selection,
    under ``cfg``, the configuration the plan was searched under."""
    cost = LatencyCost(lut)
    if cost.predict(plan) > budget_ms:
        plan, removed = prune_to(plan, scores, cost, budget_ms, cfg, e_min)
        # the last removal can overshoot by a whole block or an embedding chunk: fill back with any group
        plan, _ = refill(plan, removed + removed_pool(plan, scores, cfg.align), cost, budget_ms)
        return plan
    plan, _ = refill(plan, removed_pool(plan, scores, cfg.align), cost, budget_ms)
    return plan


def closed_loop(plan: Plan, lut, requested: float, measure: Measure, scores: dict, cfg: SearchConfig, e_min: int,
                log: Callable[[str], None] = print, adapt: Callable[[Plan], dict] | None = None) -> LoopResult:
    """Measure ``plan`` against the teacher and correct it until the ratio is within tolerance.

    Each round records the LUT budget the plan was made for, the predicted and
    measured ratios, the miss, and the corrected budget for the next round (all
    as fractions of the teacher). ``cfg`` is the configuration the plan was searched under
    (its strategy's constraints applied); corrections keep to it.
    Without convergence the result is the measured plan closest to ``requested``.

    ``adapt(plan) -> scores`` (issue 25): called with every corrected plan before it is measured; it adapts the
    weights to the groups the correction removed or put back (a few KD steps) and returns their scores, which
    the next correction ranks by. Without it every correction ranks by ``scores``, the searched weights'.
    """
    t_pred = lut.predict(Plan.full(lut.spec))
    budget = plan.meta.get("budget", requested * t_pred) if plan.meta.get("unit", "ms") == "ms" else requested * t_pred
    res = LoopResult(plan, requested)
    seen = set()
    for r in range(cfg.measured_rounds + 1):
        t_ms, s_ms = measure(plan)
        m, p = s_ms / t_ms, lut.predict(plan) / t_pred
        miss = m / requested - 1.0
        rec = {"round": r, "budget_ratio": budget / t_pred, "predicted_ratio": p, "measured_ratio": m,
               "teacher_ms": t_ms, "student_ms": s_ms, "miss_pct": 100.0 * miss, "corrected_budget_ratio": None}
        res.rounds.append(rec)
        res.plans.append(plan)
        if abs(miss) <= cfg.measured_tolerance:
            res.converged = True
            log(f"[measure] round {r}: predicted {p:.1%}, measured {m:.1%} of the teacher (requested {requested:.1%}, "
                f"{100 * miss:+.1f}%): within +-{pct(cfg.measured_tolerance)}")
            break
        if r == cfg.measured_rounds:
            log(f"[measure] round {r}: measured {m:.1%} of the teacher, {100 * miss:+.1f}% off the requested "
                f"{requested:.1%}; no correction rounds left (search.measured_rounds={cfg.measured_rounds})")
            break
        aim, rule = next_ratio([(q["predicted_ratio"], q["measured_ratio"]) for q in res.rounds], requested)
        budget = t_pred * aim
        rec["corrected_budget_ratio"], rec["rule"] = aim, rule
        seen.add((plan.embed_dim, tuple(plan.block_dims())))
        new = correct_plan(plan, lut, scores, cfg, e_min, budget)
        log(f"[measure] round {r}: predicted {p:.1%}, measured {m:.1%} of the teacher (requested {requested:.1%}, "
            f"{100 * miss:+.1f}%); correcting ({rule}): LUT budget {rec['budget_ratio']:.1%} -> {budget / t_pred:.1%}, "
            f"new plan predicted {lut.predict(new) / t_pred:.1%}")
        key = (new.embed_dim, tuple(new.block_dims()))
        if key in seen:  # the grain of the groups cannot express the correction
            rec["note"] = "the correction gives a plan already measured; stopped"
            log("[measure] the corrected plan equals one already measured; stopping")
            break
        new.meta = {**plan.meta, "budget": budget, "predicted": lut.predict(new)}
        if adapt is not None:
            scores = adapt(new)
        plan = new
    res.chosen_round = len(res.rounds) - 1
    if not res.converged:  # the closest measured plan; on a tie the faster one (a budget is an upper bound)
        res.chosen_round = min(range(len(res.rounds)), key=lambda i: (abs(res.rounds[i]["miss_pct"]),
                                                                       res.rounds[i]["measured_ratio"]))
        c = res.rounds[res.chosen_round]
        log(f"[measure] did NOT converge to within +-{pct(cfg.measured_tolerance)} of the requested {requested:.1%} "
            f"in {len(res.rounds)} measurements: keeping round {res.chosen_round}'s plan, the closest measured "
            f"({c['measured_ratio']:.1%} of the teacher, {c['miss_pct']:+.1f}%)")
    res.plan = res.plans[res.chosen_round]
    return res
