"""``uvc``: UVC's budgeted gates with block skipping (Yu et al., ICLR 2022), on the measured LUT.

Every unit and every block has a logit; each step samples Gumbel-sigmoid gates
(temperature annealed geometrically from ``search.gumbel_tau[0]`` to ``[1]``),
so the gates become binary as training goes on. The soft latency is the LUT
linearised at the full plan,
``shell + sum_i p_i * (block_i - sum_{u in i} ms_u * (1 - p_u)) - sum_e ms_e * (1 - p_e)``
with ``p = sigmoid(logit)`` (the expected gate). The budget is a hard
constraint handled by primal-dual updates: the loss adds ``lambda * (soft -
budget) / T`` and the dual variable follows ``lambda <- max(0, lambda +
search.dual_lr * (soft - budget) / T)`` each step, so the constraint is met by
the end of training, not by a final global threshold. The plan keeps the units
and blocks with ``p >= 0.5``. Its LUT prediction (the *realised* latency) is
reported beside the soft one, as UVC reported its soft and realised FLOPs; if
rounding made the realised plan miss the budget, the knapsack selection on
``p`` removes the least probable groups until it fits (logged as a repair).
Kept units then run with gate 1 (the samples were near-binary at the end).
"""
from __future__ import annotations

from typing import Optional

import torch

from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search.base import SearchContext
from vitrim.pipeline.search.greedy import prune_to
from vitrim.pipeline.search.groups import EMBED, WIDTH_DIMS, GroupKey
from vitrim.pipeline.search.masked import MaskedSearch, keep_values, plan_from_values
from vitrim.pipeline.search.saliency import set_gate


def block_keep(logits: dict, depth: int, min_blocks: int) -> list[bool]:
    """Blocks whose gate probability is >= 0.5, and at least the ``min_blocks`` most probable."""
    p = [float(torch.sigmoid(logits[GroupKey("block", i)].detach())) for i in range(depth)]
    keep = [q >= 0.5 for q in p]
    if sum(keep) < min_blocks:  # the most probable blocks up to the floor
        for i in sorted(range(len(p)), key=lambda i: -p[i])[:min_blocks]:
            keep[i] = True
    return keep


class Uvc(MaskedSearch):
    """UVC: Gumbel-sigmoid gates on units and blocks, the budget a constraint met by dual ascent."""

    name = "uvc"

    def init_masks(self, ctx: SearchContext, gates: dict, searched: list[GroupKey]) -> list[torch.Tensor]:
        # logits of Gumbel-sigmoid gates; p = sigmoid(logit) starts at 0.95
        cfg = ctx.cfg
        self.searched = searched
        self.skip = cfg.prune_blocks
        self.logits = {k: torch.full_like(gates[k], 3.0, requires_grad=True) for k in searched}
        if self.skip:
            self.logits.update({GroupKey("block", i): torch.full((1,), 3.0, device=ctx.device, requires_grad=True)
                                for i in range(ctx.spec["depth"])})
        self.gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        self.lam, self.dual_lr = 0.0, cfg.dual_lr
        self.viol: Optional[torch.Tensor] = None
        self.tau = cfg.gumbel_tau[0]
        return list(self.logits.values())

    def soft_latency(self, ctx: SearchContext, p: dict) -> torch.Tensor:
        """The LUT linearised at the full plan, at gate probabilities ``p``."""
        ms = self.ms
        lat = torch.zeros((), device=ctx.device) + self.shell
        for i in range(ctx.spec["depth"]):
            blk = ms[GroupKey("block", i)].sum()
            for d in WIDTH_DIMS:
                k = GroupKey(d, i)
                if k in p:
                    blk = blk - (ms[k] * (1 - p[k])).sum()
            b = GroupKey("block", i)
            lat = lat + (p[b].squeeze() if b in p else 1.0) * blk
        if EMBED in p:
            lat = lat - (ms[EMBED] * (1 - p[EMBED])).sum()
        return lat

    def penalty(self, ctx: SearchContext, it: int, n_iters: int) -> tuple[torch.Tensor, dict]:
        tau0, tau1 = ctx.cfg.gumbel_tau
        self.tau = tau0 * (tau1 / tau0) ** ((it - 1) / max(1, n_iters - 1))
        p = {k: torch.sigmoid(v) for k, v in self.logits.items()}
        for k, v in self.logits.items():  # a Gumbel-sigmoid sample (logistic noise) per gate
            u = torch.rand(v.shape, generator=self.gen, device=ctx.device).clamp_(1e-6, 1 - 1e-6)
            set_gate(ctx.student, k, torch.sigmoid((v + torch.log(u) - torch.log1p(-u)) / self.tau))
        soft = self.soft_latency(ctx, p)
        self.viol = (soft - ctx.budget) / self.T
        return self.lam * self.viol, {"soft_cost": float(soft.detach()), "lambda": self.lam}

    def after_step(self) -> None:
        self.lam = max(0.0, self.lam + self.dual_lr * float(self.viol.detach()))

    def values(self) -> dict:
        return keep_values(self.gates, self.searched, {k: torch.sigmoid(v) for k, v in self.logits.items()})

    def hard_plan(self, ctx: SearchContext, vals: dict) -> Plan:
        bk = block_keep(self.logits, ctx.spec["depth"], ctx.cfg.min_blocks) if self.skip else None
        return plan_from_values(ctx.spec, vals, 0.5, ctx.floors, ctx.e_min, ctx.cfg.align, bk)

    def progress_note(self, aux: dict) -> str:
        return f"(soft {aux['soft_cost']:.3f}, lambda {self.lam:.3f}, tau {self.tau:.3f})"

    def final_plan(self, ctx: SearchContext) -> tuple[Plan, dict]:
        cost, budget, spec = ctx.cost, ctx.budget, ctx.spec
        vals = self.values()
        plan = self.hard_plan(ctx, vals)
        with torch.no_grad():
            soft_final = float(self.soft_latency(ctx, {k: torch.sigmoid(v) for k, v in self.logits.items()}))
        realised = cost.predict(plan)
        repair = 0
        if realised > budget + 1e-9:  # rounding to aligned widths and p >= 0.5 can overshoot: repair
            scores = dict(vals)  # every width group and the embedding
            for i in range(spec["depth"]):
                b = GroupKey("block", i)
                scores[b] = torch.sigmoid(self.logits[b]).detach().cpu() if self.skip else torch.full((1,), float("inf"))
            plan, removed = prune_to(plan, scores, cost, budget, ctx.cfg, ctx.e_min)
            repair = len(removed)
        gap = {"soft": soft_final, "realised": realised, "after_repair": cost.predict(plan), "repair_groups": repair,
               "gap_pct": 100 * (realised - soft_final) / soft_final}
        ctx.log(f"[search] uvc: soft latency {soft_final:.3f} {cost.unit}, realised plan {realised:.3f} "
                f"({gap['gap_pct']:+.1f}%)" + (f"; repaired by removing {repair} groups -> {cost.predict(plan):.3f}"
                                              if repair else ""))
        for blk in ctx.student.blocks:  # back to deterministic gates for the adaptation
            blk.gate = None
        return plan, gap

    def plan_meta(self, gap: dict) -> dict:
        return {"uvc": gap}
