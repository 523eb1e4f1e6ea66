"""Greedy selection on a cost model: remove the cheapest groups until a target is met, then refill.

:func:`prune_to` removes one group at a time, the one a *ranking* puts first,
until ``cost.predict(plan) <= target``. Two rankings:

* :func:`knapsack_ratio` (HALP, Shen et al. 2022): the least importance per unit
  of cost saved;
* :func:`nvit_penalty`: NViT's latency-regularised score
  ``S/mean(S) - eta * dLat/mean(dLat)``.

Only groups whose saving is positive are ranked: a group that saves no time (a
flat or non-monotone LUT entry) is never removed while one that saves time
exists. :func:`refill` then puts removed groups back while the plan fits, since a
greedy step can overshoot (a whole block is a big item).
"""
from __future__ import annotations

from typing import Callable, Optional

from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.search.cost import Cost
from vitrim.pipeline.search.groups import Candidate, apply_addition, apply_removal, candidates

# a ranking gets the candidates of one removal and returns their sort key (lowest is removed first)
Ranking = Callable[[list[Candidate]], Callable[[Candidate], float]]


def knapsack_ratio(cands: list[Candidate]) -> Callable[[Candidate], float]:
    """HALP's knapsack: least importance per unit of cost saved."""
    return lambda c: c.saliency / c.saved


def nvit_penalty(eta: float) -> Ranking:
    """NViT: ``S / mean(S) - eta * saved / mean(saved)``, both means over the first removal's candidates
    (one normalisation for the whole :func:`prune_to` call: make a new ranking for each call)."""
    norm: list[float] = []

    def rank(cands: list[Candidate]) -> Callable[[Candidate], float]:
        if not norm:
            norm.append(sum(c.saliency for c in cands) / len(cands) or 1.0)
            norm.append(sum(c.saved for c in cands) / len(cands) or 1.0)
        return lambda c: c.saliency / norm[0] - eta * c.saved / norm[1]

    return rank


def prune_to(plan: Plan, scores: dict, cost: Cost, target: float, cfg: SearchConfig, e_min: int,
             merges: Optional[dict] = None, min_tokens: int = 1, rank: Ranking = knapsack_ratio
             ) -> tuple[Plan, list[Candidate]]:
    """Greedily remove groups until ``cost.predict(plan) <= target``, lowest ``rank`` first.

    ``cfg``: the configuration searched under (floors, alignment, what may be removed);
    ``merges``: {merge key: saliency} of token merges to consider (``search.prune_tokens``)."""
    fl = Floors.from_config(cfg)
    removed: list[Candidate] = []
    while cost.predict(plan) > target:
        cands = candidates(plan, scores, fl, e_min, cfg.min_blocks, cfg.align, cfg.prune_embed, cfg.prune_blocks,
                           merges, cfg.max_merges, min_tokens)
        if not cands:
            break
        for c in cands:
            c.saved = cost.saved(plan, c.key, len(c.units) or 1)
        # A group that saves no time is never taken while one that does exists: with a noisy,
        # non-monotone LUT a near-dead group of zero or negative saving would otherwise win the
        # ratio below (0/0-ish) and the loop would then fall back to the biggest saving, whatever
        # its importance. Ranking only the groups that save time keeps importance per ms saved
        # the criterion all the way down.
        cands = [c for c in cands if c.saved > 0]
        if not cands:
            break  # nothing left saves time; the caller reports the unreachable budget
        key = rank(cands)
        # equal keys (e.g. several free groups): the bigger saving first, then a fixed order
        best = min(cands, key=lambda c: (key(c), -c.saved, c.block if c.block is not None else -1, c.dim))
        if best.dim == "block":
            b = plan.blocks[best.block]
            best.snapshot = BlockPlan(True, list(b.heads), list(b.qk), list(b.v), list(b.mlp))
        plan = apply_removal(plan, best.key, len(best.units), best.units or None)
        removed.append(best)
    return plan, removed


def refill(plan: Plan, removed: list[Candidate], cost: Cost, budget: float) -> tuple[Plan, list[Candidate]]:
    """Knapsack fill: greedy steps overshoot the budget (a whole block is a big item), so put
    back removed groups, most importance per unit of added cost first, while the plan fits."""
    pool = list(removed)
    added: list[Candidate] = []
    while pool:
        cur = cost.predict(plan)
        best = None
        for c in pool:
            p2 = apply_addition(plan, c)
            if p2 is None:
                continue
            extra = cost.predict(p2) - cur
            if cur + extra > budget:
                continue
            key = c.saliency / max(extra, 1e-9)
            if best is None or key > best[0]:
                best = (key, c, p2)
        if best is None:
            break
        plan = best[2]
        pool.remove(best[1])
        added.append(best[1])
    return plan, added
