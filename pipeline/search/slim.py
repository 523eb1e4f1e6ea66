"""``slim``: ViT-Slim's learnable masks (Chavan et al., CVPR 2022) with a latency-weighted l1 on the measured LUT.

Masks initialised at 1 on every head, QK and V dim, MLP neuron and embedding
channel, clamped to [0, 1] after each step. The loss is
``KD + search.slim_l1 * sum_u (ms_u / T) * m_u``: an l1 penalty in which each
unit's weight is its latency share from the LUT (``ms_u``: the LUT's marginal
saving of that unit at the full plan, ``T``: the teacher's predicted latency),
so the penalty is in milliseconds, not in unit counts (ViT-Slim weighs each dim
*type* by a constant). After ``search.mask_iters`` steps one global threshold on
the mask values is found by bisection so that ``predict(plan) <= budget``;
widths are rounded up to ``search.align`` and held at the floors. Kept masks
are folded into the weights, then a short KD pass (``search.kd_iters``) with the
hard masks adapts them.

Every mask is a per-unit scale on a linear map, so the fold is exact: the
network handed on computes what the masked network computes at the plan (the
trained mask values on the kept units, 0 on the pruned ones; tested). The
embedding mask scales the output of every LayerNorm on the residual stream (its
affine weight and bias), and the head's input where no LayerNorm precedes it
(:func:`scale_embed`); the LayerNorms' statistics are not weighted by it. A mask
inside the statistics (the search gates' masked LayerNorm fed soft values)
cannot be folded into any sliced network: its mean and variance would be
mask-weighted, and a LayerNorm over the kept channels has no weights for that.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.search.base import SearchContext
from vitrim.pipeline.search.cost import Cost
from vitrim.pipeline.search.groups import EMBED, GroupKey
from vitrim.pipeline.search.masked import MaskedSearch, keep_values, plan_from_values


def threshold_to_budget(spec: dict, vals: dict, cost: Cost, budget: float, fl: Floors, e_min: int, align: int,
                        block_keep: list[bool] | None = None) -> tuple[Plan, float]:
    """The lowest global threshold whose plan fits ``budget`` (bisection on the mask values)."""
    finite = [float(v[torch.isfinite(v)].max()) for v in vals.values() if torch.isfinite(v).any()]
    lo, hi = 0.0, max(finite, default=1.0) + 1e-6
    if cost.predict(plan_from_values(spec, vals, lo, fl, e_min, align, block_keep)) <= budget:
        return plan_from_values(spec, vals, lo, fl, e_min, align, block_keep), lo
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost.predict(plan_from_values(spec, vals, mid, fl, e_min, align, block_keep)) <= budget:
            hi = mid
        else:
            lo = mid
    return plan_from_values(spec, vals, hi, fl, e_min, align, block_keep), hi


def embed_mask_sites(model: CompactViT) -> tuple[list[nn.LayerNorm], list[nn.Linear]]:
    """Where slim's embedding mask acts: every LayerNorm on the residual stream (its output), and the
    classifier heads whose input comes from the residual stream with no LayerNorm in between."""
    lns = [model.norm_pre, *[n for b in model.blocks for n in (b.norm1, b.norm2)], model.norm, model.fc_norm]
    heads = []
    if model.norm is None:  # CompactViT.forward_head: the heads read the residual stream (masked by gate_embed)
        if model.attn_pool is not None:  # the attention pool's kv reads it, not the head
            heads = [model.attn_pool.kv]
        elif model.head_dist is not None:
            heads = [model.head, model.head_dist]
        elif model.fc_norm is None:
            heads = [model.head]
    return [ln for ln in lns if ln is not None], heads


class _Scaled(nn.Module):
    """A parametrization: ``w * mask`` along ``dim`` (the mask is a plain tensor, trained apart from the weights)."""

    def __init__(self, mask: torch.Tensor, dim: int):
        super().__init__()
        self.mask, self.dim = mask, dim

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (self.mask if self.dim == -1 or w.dim() == 1 else self.mask[None, :])


def scale_embed(model: CompactViT, mask: torch.Tensor) -> Callable[[], None]:
    """Install slim's embedding ``mask`` (per residual channel) on ``model``; returns the function that removes it.

    The mask multiplies each residual-stream LayerNorm's weight and bias and the columns of the
    heads in :func:`embed_mask_sites`, as a parametrization (the weights' own tensors stay the
    optimizer's, the mask gets its gradient), so :func:`fold_masks` with the same mask reproduces it.
    """
    from torch.nn.utils import parametrize

    lns, heads = embed_mask_sites(model)
    sites = [(ln, name, -1) for ln in lns for name in ("weight", "bias")] + [(h, "weight", 1) for h in heads]
    for mod, name, dim in sites:
        parametrize.register_parametrization(mod, name, _Scaled(mask, dim), unsafe=True)

    def remove() -> None:  # back to the unscaled tensors (the same Parameter objects)
        for mod, name, _ in sites:
            parametrize.remove_parametrizations(mod, name, leave_parametrized=False)

    return remove


@torch.no_grad()
def fold_masks(model: CompactViT, gates: dict) -> None:
    """Fold the masks' values into the weights (exact: each is a per-unit scale of a linear map).

    ``gates``: each block's ``heads``, ``qk``, ``v`` and ``mlp`` mask and, when present, the embedding's
    (slim's embedding mask, acting as :func:`scale_embed` installs it). Folded, with 0/1 gates at the plan,
    the model computes what it computed with these mask values on the kept units and 0 on the pruned ones.
    """
    if EMBED in gates:
        m = gates[EMBED]
        lns, heads = embed_mask_sites(model)
        for ln in lns:
            ln.weight.mul_(m)
            ln.bias.mul_(m)
        for h in heads:
            h.weight.mul_(m[None, :])
    for j, blk in enumerate(model.blocks):
        a = blk.attn
        H, QK, V = a.heads, a.qk, a.v
        g_qk, g_v, g_h = gates[GroupKey("qk", j)], gates[GroupKey("v", j)], gates[GroupKey("heads", j)]
        rows = torch.cat([g_qk.repeat(H), torch.ones(H * QK, device=g_qk.device), g_v.repeat(H)])
        a.qkv.weight.mul_(rows[:, None])
        if a.qkv.bias is not None:
            a.qkv.bias.mul_(rows)
        a.proj.weight.mul_(g_h.repeat_interleave(V)[None, :])
        blk.mlp.fc2.weight.mul_(gates[GroupKey("mlp", j)][None, :])


class Slim(MaskedSearch):
    """ViT-Slim: l1 masks weighted by latency share, one global threshold to the budget, masks folded."""

    name = "slim"
    constraints = {"prune_blocks": False}  # its masks are on widths only

    def init_masks(self, ctx: SearchContext, gates: dict, searched: list[GroupKey]) -> list[torch.Tensor]:
        if ctx.spec.get("qk_norm"):  # a soft QK mask moves the per-head norms' statistics: no weight folds it
            raise UserError("search", "strategy 'slim' cannot fold its QK masks into a teacher with qk_norm",
                            "use search.strategy=knapsack (the default) or another gate-based strategy")
        # the width masks are the gates themselves; the embedding mask scales the residual LayerNorms' outputs
        self.searched = searched
        self.masks = {k: gates[k] for k in searched}
        self.unscale = None
        if EMBED in self.masks:  # (gate_embed stays 1: statistics over every channel while searching)
            self.masks[EMBED] = torch.ones_like(gates[EMBED])
            self.unscale = scale_embed(ctx.student, self.masks[EMBED])
        for m in self.masks.values():
            m.requires_grad_(True)
        return list(self.masks.values())

    def penalty(self, ctx: SearchContext, it: int, n_iters: int) -> tuple[torch.Tensor, dict]:
        l1 = sum((self.ms[k] / self.T * self.masks[k]).sum() for k in self.searched)
        return ctx.cfg.slim_l1 * l1, {"l1": float(l1.detach())}

    def after_step(self) -> None:
        with torch.no_grad():
            for m in self.masks.values():
                m.clamp_(0.0, 1.0)

    def progress(self, aux: dict) -> None:  # the masks' range after the clamp (ViT-Slim keeps them in [0, 1])
        aux["mask_min"] = min(float(m.detach().min()) for m in self.masks.values())
        aux["mask_max"] = max(float(m.detach().max()) for m in self.masks.values())

    def values(self) -> dict:
        return keep_values({**self.gates, **self.masks}, self.searched)

    def hard_plan(self, ctx: SearchContext, vals: dict) -> Plan:
        return threshold_to_budget(ctx.spec, vals, ctx.cost, ctx.budget, ctx.floors, ctx.e_min, ctx.cfg.align)[0]

    def progress_note(self, aux: dict) -> str:
        return f"(at the budget's threshold; l1 {aux['l1']:.4f})"

    def final_plan(self, ctx: SearchContext) -> tuple[Plan, dict]:
        if self.unscale is not None:  # the mask is folded below (or the search fails): the weights' own tensors back
            self.unscale()
        plan, thr = threshold_to_budget(ctx.spec, self.values(), ctx.cost, ctx.budget, ctx.floors, ctx.e_min,
                                        ctx.cfg.align)
        return plan, {"threshold": thr}

    def hand_on(self, ctx: SearchContext) -> None:
        # fold the masks' values (embedding included) into the weights, so the network handed on is the
        # masked one at the plan
        with torch.no_grad():
            for m in self.masks.values():
                m.requires_grad_(False)
            fold_masks(ctx.student, self.masks)

    def plan_meta(self, gap: dict) -> dict:
        return {"slim_threshold": gap["threshold"]}
