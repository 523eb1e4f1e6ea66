"""Learned-mask search on the measured LUT: the common base of ``slim`` and ``uvc`` (issue 17).

Both train continuous masks jointly with the weights under KD, on the *same*
gate tensors the saliency search uses
(:func:`~vitrim.pipeline.search.saliency.attach_gates`; slim's embedding mask
excepted), so a mask of 0 or 1 computes exactly what the sliced model computes.
Both then hand a hard :class:`~vitrim.pipeline.core.plan.Plan` to the usual
slice, fine-tune and export. :class:`MaskedSearch` is the loop; what the masks
are, the term they add to the loss, how they turn into a plan and what the
network handed on is are its subclasses' methods
(:class:`~vitrim.pipeline.search.slim.Slim`, :class:`~vitrim.pipeline.search.uvc.Uvc`).

Per-unit latency shares (:func:`unit_costs`) are the LUT's marginal saving of
each unit at the full plan, so penalties are in milliseconds, not unit counts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vitrim.pipeline.core.errors import UnreachableBudget
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.search.base import SearchContext, SearchResult, Strategy, kd_adapt
from vitrim.pipeline.search.cost import Cost
from vitrim.pipeline.search.groups import EMBED, WIDTH_DIMS, GroupKey, masks_from_plan
from vitrim.pipeline.search.saliency import attach_gates, detach_gates


def unit_costs(cost: Cost, spec: dict, align: int) -> dict[GroupKey, torch.Tensor]:
    """Per-unit cost shares (in the cost's unit) at the full plan; a block key's is the whole block's."""
    full = Plan.full(spec)
    out = {}
    for i in range(spec["depth"]):
        for dim in WIDTH_DIMS:
            n_full = len(getattr(full.blocks[i], dim))
            n = 1 if dim == "heads" else min(align, n_full)
            out[GroupKey(dim, i)] = torch.full((n_full,), max(cost.saved(full, GroupKey(dim, i), n), 0.0) / n)
        out[GroupKey("block", i)] = torch.tensor([max(cost.saved(full, GroupKey("block", i), 1), 0.0)])
    n = min(align, spec["embed_dim"])
    out[EMBED] = torch.full((spec["embed_dim"],), max(cost.saved(full, EMBED, n), 0.0) / n)
    return out


def plan_from_values(spec: dict, vals: dict, t: float, fl: Floors, e_min: int, align: int,
                     block_keep: list[bool] | None = None) -> Plan:
    """Keep every unit whose value is ``>= t`` (widths rounded up to ``align``, at least the floors)."""
    def keep(v: torch.Tensor, floor: int, a: int) -> list[int]:
        n = len(v)
        k = int((v >= t).sum())
        k = min(n, -(-k // a) * a) if a > 1 else k
        k = max(k, min(n, max(floor, a)))
        return sorted(sorted(range(n), key=lambda u: (-float(v[u]), u))[:k])

    blocks = []
    for i in range(spec["depth"]):
        if block_keep is not None and not block_keep[i]:
            blocks.append(BlockPlan(False))
            continue
        w = {d: keep(vals[GroupKey(d, i)], getattr(fl, d), 1 if d == "heads" else align) for d in WIDTH_DIMS}
        blocks.append(BlockPlan(True, w["heads"], w["qk"], w["v"], w["mlp"]))
    return Plan(spec=dict(spec), embed_keep=keep(vals[EMBED], e_min, align), blocks=blocks)


def keep_values(gates: dict, searched: list[GroupKey], probs: dict | None = None) -> dict:
    """Per-unit keep values of every width group and the embedding: ``probs`` (uvc's gate probabilities) or
    the gates themselves (slim's masks) for the ``searched`` groups; infinity (always kept) for the others."""
    out = {}
    for k, g in gates.items():
        if k.dim == "block":
            continue
        if k in searched:
            out[k] = (probs[k] if probs is not None else g).detach().cpu()
        else:
            out[k] = torch.full(g.shape, math.inf)
    return out


class MaskedSearch(Strategy):
    """Masks trained jointly with the weights under KD for ``search.mask_iters`` steps, then a hard plan.

    Subclasses say what the masks are (:meth:`init_masks`), what they add to the loss
    (:meth:`penalty`, :meth:`after_step`), the plan they give during and after training
    (:meth:`hard_plan`, :meth:`final_plan`) and the network handed on (:meth:`hand_on`).
    """

    def init_masks(self, ctx: SearchContext, gates: dict, searched: list[GroupKey]) -> list[torch.Tensor]:
        """Set up the masks on the gated student; returns the tensors the optimizer trains."""
        raise NotImplementedError

    def penalty(self, ctx: SearchContext, it: int, n_iters: int) -> tuple[torch.Tensor, dict]:
        """The term added to the KD loss at iteration ``it`` (set before the forward), and what to record."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After the optimizer's step (a dual update, a clamp)."""

    def progress(self, aux: dict) -> None:
        """Add to a progress record (``aux``, from :meth:`penalty`)."""

    def values(self) -> dict:
        """Per-unit keep values (:func:`keep_values`)."""
        raise NotImplementedError

    def hard_plan(self, ctx: SearchContext, vals: dict) -> Plan:
        """The plan the masks give now (progress records)."""
        raise NotImplementedError

    def progress_note(self, aux: dict) -> str:
        raise NotImplementedError

    def final_plan(self, ctx: SearchContext) -> tuple[Plan, dict]:
        """The plan after training, and what the plan's meta and the last record get."""
        raise NotImplementedError

    def hand_on(self, ctx: SearchContext) -> None:
        """Make the student the network the plan hands on (before the hard-gated KD pass)."""

    def plan_meta(self, gap: dict) -> dict:
        raise NotImplementedError

    def search(self, ctx: SearchContext) -> SearchResult:
        cfg, cost, budget, student, spec = ctx.cfg, ctx.cost, ctx.budget, ctx.student, ctx.spec
        T = ctx.log_start(f", {cfg.mask_iters} mask iterations")
        self.ms = {k: v.to(ctx.device) for k, v in unit_costs(cost, spec, cfg.align).items()}
        searched = [k for k in self.ms if k.dim != "block" and (k.dim != "embed" or cfg.prune_embed)]
        kd = ctx.kd
        self.gates = attach_gates(student)
        mask_params = self.init_masks(ctx, self.gates, searched)
        opt = torch.optim.AdamW([{"params": list(student.parameters()), "lr": cfg.lr, "weight_decay": 0.0},
                                 {"params": mask_params, "lr": cfg.mask_lr, "weight_decay": 0.0}])
        self.T = T
        self.shell = T - sum(float(self.ms[GroupKey("block", i)]) for i in range(spec["depth"]))
        history = [{"step": 0, "cost": T, "val_top1": None, "removed": 0, "s": 0.0}]
        n_iters = max(1, cfg.mask_iters)
        log_at = {max(1, round(k * n_iters / max(1, cfg.steps))) for k in range(1, max(1, cfg.steps) + 1)}

        student.train()
        for it in range(1, n_iters + 1):
            x, y = ctx.batches()
            term, aux = self.penalty(ctx, it, n_iters)
            loss = kd(student, x, y) + term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            self.after_step()
            if it in log_at:  # search.steps progress records, the last at the end
                self.progress(aux)
                hard = self.hard_plan(ctx, self.values())
                rec = {"step": len(history), "iter": it, "cost": cost.predict(hard), "val_top1": None,
                       "removed": None, "s": ctx.elapsed(), **aux}
                history.append(rec)
                ctx.log(f"[search] {cfg.strategy} iter {it}/{n_iters}: hard plan {rec['cost']:.3f} {cost.unit} "
                        + self.progress_note(aux))

        plan, gap = self.final_plan(ctx)
        if cost.predict(plan) > budget + 1e-9:
            raise UnreachableBudget(f"{cfg.strategy} could not reach the budget {budget:.3f} {cost.unit}; stopped "
                            f"at {cost.predict(plan):.3f}", "raise the budget, lower the floors or use strategy knapsack")
        self.hand_on(ctx)
        detach_gates(student)
        attach_gates(student, masks_from_plan(plan))
        kd_adapt(student, kd, ctx.batches, opt, cfg.kd_iters)
        acc = ctx.val_top1()
        history.append({"step": len(history), "cost": cost.predict(plan), "val_top1": acc, "removed": None,
                        "s": ctx.elapsed(), **gap})
        ctx.log(f"[search] {cfg.strategy}: plan {cost.predict(plan):.3f} {cost.unit} (budget {budget:.3f}), holdout top-1 "
                f"after {cfg.kd_iters} KD steps with hard masks {acc:.2f}%")
        return ctx.result(plan, history, **self.plan_meta(gap))
