"""The stepwise latency-aware search (NViT-style), and the strategies that configure it.

Loop: score every prunable group (:mod:`vitrim.pipeline.search.saliency`),
remove the cheapest groups until the step's target is met
(:func:`~vitrim.pipeline.search.greedy.prune_to`), fine-tune briefly with KD so
the weights keep adapting, repeat until ``cost(plan) <= budget``; after the last
step, put back removed groups that still fit (``search.refill``). Targets fall
geometrically from the teacher's cost to the budget over ``search.steps``.

Groups: heads (1 at a time), QK and V dims shared across a block's heads, MLP
neurons and embedding channels (``align`` units at a time, so widths stay
multiples of 8 for the target's fast kernels), whole blocks (UVC), and, with
``search.prune_tokens``, token merges (CAIT): their saliency is the KD-loss
change of applying the merge, measured directly
(:func:`~vitrim.pipeline.search.saliency.merge_scores`; with
``search.merge_scoring: adapted``, after ``search.merge_adapt_iters`` KD steps
of the merged network against the unmerged one adapted alike), and
their saving is the LUT's prediction with every later block at the merged
token count. Merges in ``search.merges`` are in the plan from the start and stay.

The KD between steps is ``search.kd_iters`` steps, or, with ``search.step_epochs``,
that many epochs on the training set after every step but the last (NViT's
prune-finetune iterations; the last step is followed by the fine-tune).

Strategies on this loop:

* ``knapsack`` (HALP, Shen et al. 2022): Hessian-aware saliency, the least
  importance per ms saved removed first;
* ``nvit`` (NViT, Yang et al. 2023): the same saliency, ranked by
  ``S/mean(S) - eta * dLat/mean(dLat)``;
* ``magnitude``: the knapsack ranking on L1 weight magnitude instead of saliency
  (width pruning only: L1 of a whole block has no comparable scale).
"""
from __future__ import annotations

from typing import Optional

import torch

from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.errors import UnreachableBudget
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search.base import SearchContext, SearchResult, Strategy, kd_adapt
from vitrim.pipeline.search.greedy import Ranking, knapsack_ratio, nvit_penalty, prune_to, refill
from vitrim.pipeline.search.groups import Candidate, candidates, masks_from_plan, merge_options
from vitrim.pipeline.search.saliency import attach_gates, hessian_scores, merge_scores, relative_magnitude


class StepwiseSearch(Strategy):
    """Score, prune to the step's target, adapt with KD; ``search.steps`` times. Subclasses pick the
    scores (:meth:`scores`) and the ranking (:meth:`ranking`)."""

    stepwise = True
    continues = True  # the steps' targets fall from the start plan's cost, whatever plan that is

    def ranking(self, cfg: SearchConfig) -> Ranking:
        """How :func:`~vitrim.pipeline.search.greedy.prune_to` orders the candidates (one per call)."""
        return knapsack_ratio

    def scores(self, ctx: SearchContext, plan: Plan, gates: dict, step: int, merge_log: list
               ) -> tuple[dict, Optional[dict]]:
        """(per-group scores, {merge key: saliency} or None) of the gated student at ``plan``.

        Hessian-aware saliency on ``search.saliency_batches`` batches; with ``search.prune_tokens``
        the possible merges too, on the same batches (their record appended to ``merge_log``)."""
        cfg = ctx.cfg
        batches = [ctx.batches() for _ in range(cfg.saliency_batches)]
        scores = hessian_scores(ctx.student, gates, ctx.kd, batches)
        if not cfg.prune_tokens:
            return scores, None
        options = merge_options(plan, cfg.max_merges, ctx.min_tokens)
        groups = candidates(plan, scores, ctx.floors, ctx.e_min, cfg.min_blocks, cfg.align, cfg.prune_embed,
                            cfg.prune_blocks)
        adapt = self.merge_adapter(ctx) if cfg.merge_scoring == "adapted" and options else None
        merges, info = merge_scores(ctx.student, gates, ctx.kd, batches, plan.merges, options, groups, adapt=adapt)
        merge_log.append({"step": step, **info})
        return scores, merges

    @staticmethod
    def merge_adapter(ctx: SearchContext):
        """``adapt(model)``: ``search.merge_adapt_iters`` KD steps (AdamW at ``search.lr``) on batches drawn once,
        the same for every candidate merge and for the unmerged reference."""
        cfg = ctx.cfg
        drawn = [ctx.batches() for _ in range(cfg.merge_adapt_iters)]

        def adapt(model) -> None:
            it = iter(drawn)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
            kd_adapt(model, ctx.kd, lambda: next(it), opt, len(drawn))

        return adapt

    def search(self, ctx: SearchContext) -> SearchResult:
        cfg, cost, budget, student = ctx.cfg, ctx.cost, ctx.budget, ctx.student
        ctx.log_start()
        plan = ctx.start_plan()  # the teacher with the fixed merges (search.merges), or an earlier search's plan
        start = cost.predict(plan)  # the steps' targets fall from here
        if ctx.start is not None:
            ctx.log(f"[search] continuing from an earlier plan at {start:.3f} {cost.unit} "
                    f"({ctx.start.meta.get('budget_desc') or 'its budget'}) and its weights")
        history = [{"step": 0, "cost": start, "val_top1": None, "removed": 0, "s": 0.0}]
        kd = ctx.kd
        opt = torch.optim.AdamW([p for p in student.parameters()], lr=cfg.lr, weight_decay=0.0)
        steps = max(1, cfg.steps)
        removed_all: list[Candidate] = []
        merge_log: list = []
        for step in range(1, steps + 1):
            target = start * (budget / start) ** (step / steps)
            if step == steps:
                target = budget
            gates = attach_gates(student, masks_from_plan(plan))
            student.set_token_merges(plan.merges)
            ctx.log(f"[search] step {step}/{steps}: scoring groups on {cfg.saliency_batches} batches "
                    f"({ctx.elapsed():.0f}s so far)")
            scores, merges = self.scores(ctx, plan, gates, step, merge_log)
            plan, removed = prune_to(plan, scores, cost, target, cfg, ctx.e_min, merges, ctx.min_tokens,
                                     rank=self.ranking(cfg))
            removed_all += removed
            added = []
            if step == steps and cfg.refill:
                plan, added = refill(plan, removed_all, cost, budget)
            attach_gates(student, masks_from_plan(plan))
            student.set_token_merges(plan.merges)
            iters = ctx.adapt_iters(last=step == steps)
            ctx.log(f"[search] step {step}/{steps}: pruned to {cost.predict(plan):.3f} {cost.unit}; {iters} KD steps "
                    f"({ctx.elapsed():.0f}s so far)")
            kd_adapt(student, kd, ctx.batches, opt, iters)
            acc = ctx.val_top1()
            c = cost.predict(plan)
            counts: dict = {}
            for r in removed:
                counts[r.dim] = counts.get(r.dim, 0) + 1
            rec = {"step": step, "target": target, "cost": c, "val_top1": acc, "removed": counts, "s": ctx.elapsed()}
            if cfg.prune_tokens or cfg.merges:
                rec["merges"] = {str(i): t for i, t in plan.merges.items()}
                rec["tokens"] = plan.block_tokens()
            if added:
                rec["refilled"] = len(added)
            history.append(rec)
            ctx.log(f"[search] step {step}/{steps}: {c:.3f} {cost.unit} (target {target:.3f}), removed {counts}"
                    + (f", put back {len(added)} groups to fill the budget" if added else "")
                    + f", holdout top-1 {acc:.2f}%")
        if cost.predict(plan) > budget + 1e-9:
            raise UnreachableBudget(f"could not reach the budget {budget:.3f} {cost.unit}; stopped at "
                            f"{cost.predict(plan):.3f}", "raise the budget, lower the floors or allow block/embed pruning")
        return ctx.result(plan, history, **({"merge_saliency": merge_log} if merge_log else {}))


class Knapsack(StepwiseSearch):
    """HALP's knapsack on NViT's Hessian-aware saliency: least importance per ms saved first (the default)."""

    name = "knapsack"
    merges_tokens = True


class Nvit(StepwiseSearch):
    """NViT's latency-regularised ranking ``S/mean(S) - eta * dLat/mean(dLat)`` (``search.eta``)."""

    name = "nvit"
    merges_tokens = True

    def ranking(self, cfg: SearchConfig) -> Ranking:
        return nvit_penalty(cfg.eta)


class Magnitude(StepwiseSearch):
    """The knapsack loop on per-group relative L1 magnitude, width groups only."""

    name = "magnitude"
    constraints = {"prune_blocks": False}  # L1 of a whole block has no scale comparable with a width group's

    def scores(self, ctx: SearchContext, plan: Plan, gates: dict, step: int, merge_log: list
               ) -> tuple[dict, Optional[dict]]:
        return relative_magnitude(ctx.student), None

    def correction_scores(self, student, plan, inputs) -> dict:
        return relative_magnitude(student)
