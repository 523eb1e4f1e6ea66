"""Learned-mask strategies on the measured LUT: ViT-Slim (``slim``) and UVC (``uvc``) (issue 17).

Both train continuous masks jointly with the weights under KD, on the *same*
gate tensors the saliency search uses (``saliency.attach_gates``; slim's
embedding mask excepted, see below), so a mask of 0 or 1 computes exactly what
the sliced model computes. Both then hand a
hard :class:`~vitrim.pipeline.core.plan.Plan` to the usual slice, fine-tune
and export.

**slim** (ViT-Slim, Chavan et al., CVPR 2022). Masks initialised at 1 on every
head, QK and V dim, MLP neuron and embedding channel, clamped to [0, 1] after
each step. The loss is ``KD + search.slim_l1 * sum_u (ms_u / T) * m_u``: an l1
penalty in which each unit's weight is its latency share from the LUT
(``ms_u``: the LUT's marginal saving of that unit at the full plan, ``T``: the
teacher's predicted latency), so the penalty is in milliseconds, not in unit
counts (ViT-Slim weighs each dim *type* by a constant). After
``search.mask_iters`` steps one global threshold on the mask values is found by
bisection so that ``predict(plan) <= budget``; widths are rounded up to
``search.align`` and held at the floors. Kept masks are folded into the weights,
then a short KD pass (``search.kd_iters``) with the hard masks adapts them.
Every mask is a per-unit scale on a linear map, so the fold is exact: the
network handed on computes what the masked network computes at the plan
(the trained mask values on the kept units, 0 on the pruned ones; tested).
The embedding mask scales the output of every LayerNorm on the residual stream
(its affine weight and bias), and the head's input where no LayerNorm precedes
it (:func:`scale_embed`); the LayerNorms' statistics are not weighted by it. A
mask inside the statistics (the search gates' masked LayerNorm fed soft values)
cannot be folded into any sliced network: its mean and variance would be
mask-weighted, and a LayerNorm over the kept channels has no weights for that.

**uvc** (UVC, Yu et al., ICLR 2022). Every unit and every block has a logit;
each step samples Gumbel-sigmoid gates (temperature annealed geometrically
from ``search.gumbel_tau[0]`` to ``[1]``), so the gates become binary as
training goes on. The soft latency is the LUT linearised at the full plan,
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

import math
import time
from typing import Callable

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan

DIMS = ("heads", "qk", "v", "mlp")


def unit_costs(cost, spec: dict, align: int) -> dict:
    """Per-unit latency shares (in the cost's unit) at the full plan; ``b{i}.block`` is the whole block."""
    full = Plan.full(spec)
    out = {}
    for i in range(spec["depth"]):
        for dim in DIMS:
            n_full = len(getattr(full.blocks[i], dim))
            n = 1 if dim == "heads" else min(align, n_full)
            out[f"b{i}.{dim}"] = torch.full((n_full,), max(cost.saved(full, i, dim, n), 0.0) / n)
        out[f"b{i}.block"] = torch.tensor([max(cost.saved(full, i, "block", 1), 0.0)])
    n = min(align, spec["embed_dim"])
    out["embed"] = torch.full((spec["embed_dim"],), max(cost.saved(full, None, "embed", n), 0.0) / n)
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

    floors = {"heads": fl.heads, "qk": fl.qk, "v": fl.v, "mlp": fl.mlp}
    blocks = []
    for i in range(spec["depth"]):
        if block_keep is not None and not block_keep[i]:
            blocks.append(BlockPlan(False))
            continue
        w = {d: keep(vals[f"b{i}.{d}"], floors[d], 1 if d == "heads" else align) for d in DIMS}
        blocks.append(BlockPlan(True, w["heads"], w["qk"], w["v"], w["mlp"]))
    return Plan(spec=dict(spec), embed_keep=keep(vals["embed"], e_min, align), blocks=blocks)


def threshold_to_budget(spec: dict, vals: dict, cost, budget: float, fl: Floors, e_min: int, align: int,
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
        if model.head_dist is not None:
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

    ``gates``: ``b{j}.heads|qk|v|mlp`` and, when present, ``embed`` (slim's embedding mask, acting as
    :func:`scale_embed` installs it). Folded, with 0/1 gates at the plan, the model computes what it
    computed with these mask values on the kept units and 0 on the pruned ones.
    """
    if "embed" in gates:
        m = gates["embed"]
        lns, heads = embed_mask_sites(model)
        for ln in lns:
            ln.weight.mul_(m)
            ln.bias.mul_(m)
        for h in heads:
            h.weight.mul_(m[None, :])
    for j, blk in enumerate(model.blocks):
        a = blk.attn
        H, QK, V = a.heads, a.qk, a.v
        g_qk, g_v, g_h = gates[f"b{j}.qk"], gates[f"b{j}.v"], gates[f"b{j}.heads"]
        rows = torch.cat([g_qk.repeat(H), torch.ones(H * QK, device=g_qk.device), g_v.repeat(H)])
        a.qkv.weight.mul_(rows[:, None])
        if a.qkv.bias is not None:
            a.qkv.bias.mul_(rows)
        a.proj.weight.mul_(g_h.repeat_interleave(V)[None, :])
        blk.mlp.fc2.weight.mul_(gates[f"b{j}.mlp"][None, :])


def run_mask_search(teacher: nn.Module, student: CompactViT, lut, cfg: SearchConfig, train_ds, val_ds,
                    batch_size: int = 128, kd_alpha: float = 1.0, kd_T: float = 2.0,
                    log: Callable[[str], None] = print, device: str = "cpu", workers: int = 0):
    """``slim`` or ``uvc``: learn masks under KD, then a hard plan within the budget."""
    from vitrim.pipeline.core.errors import UserError
    from vitrim.pipeline.stages.distill import make_kd_fn
    from vitrim.pipeline.stages.saliency import attach_gates, detach_gates
    from vitrim.pipeline.stages.search import (BatchStream, SearchResult, _val_top1, floor_plan, kd_adapt,
                                               masks_from_plan, prune_to, resolve_budget)

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    spec = lut.spec
    cost, budget, desc = resolve_budget(cfg, lut)
    uvc = cfg.strategy == "uvc"
    e_min = lut.grid.embed[0] if cfg.prune_embed else spec["embed_dim"]
    fl = Floors(cfg.min_heads, cfg.min_qk, cfg.min_v, cfg.min_mlp)
    skip = uvc and cfg.prune_blocks
    lower = cost.predict(floor_plan(spec, fl, e_min, cfg.min_blocks if skip else spec["depth"], cfg.align))
    full = Plan.full(spec)
    T = cost.predict(full)
    if budget < lower:
        raise UserError("search", f"budget {budget:.3f} {cost.unit} ({desc}) is below the smallest reachable "
                        f"{lower:.3f} {cost.unit} for strategy {cfg.strategy}",
                        f"raise the budget above {lower:.3f} {cost.unit} or lower the floors")
    log(f"[search] {cfg.strategy}: teacher {T:.3f} {cost.unit} -> budget {budget:.3f} {cost.unit} ({desc}), "
        f"{cfg.mask_iters} mask iterations")
    ms = {k: v.to(device) for k, v in unit_costs(cost, spec, cfg.align).items()}
    width_keys = [k for k in ms if not k.endswith(".block") and (k != "embed" or cfg.prune_embed)]
    teacher.to(device).eval()
    student.to(device)
    kd = make_kd_fn(teacher, kd_alpha, kd_T)
    gates = attach_gates(student)
    unscale = None
    if uvc:  # logits of Gumbel-sigmoid gates; p = sigmoid(logit) starts at 0.95
        logits = {k: torch.full_like(gates[k], 3.0, requires_grad=True) for k in width_keys}
        if skip:
            logits.update({f"b{i}.block": torch.full((1,), 3.0, device=device, requires_grad=True)
                           for i in range(spec["depth"])})
        mask_params = list(logits.values())
    else:  # the width masks are the gates themselves; the embedding mask scales the residual LayerNorms' outputs
        masks = {k: gates[k] for k in width_keys}
        if "embed" in masks:  # (gate_embed stays 1: statistics over every channel while searching)
            masks["embed"] = torch.ones_like(gates["embed"])
            unscale = scale_embed(student, masks["embed"])
        for m in masks.values():
            m.requires_grad_(True)
        mask_params = list(masks.values())
    opt = torch.optim.AdamW([{"params": list(student.parameters()), "lr": cfg.lr, "weight_decay": 0.0},
                             {"params": mask_params, "lr": cfg.mask_lr, "weight_decay": 0.0}])
    batches = BatchStream(train_ds, batch_size, cfg.seed, device, workers)
    shell = T - sum(float(ms[f"b{i}.block"]) for i in range(spec["depth"]))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    lam = 0.0
    history = [{"step": 0, "cost": T, "val_top1": None, "removed": 0, "s": 0.0}]
    n_iters = max(1, cfg.mask_iters)
    log_at = {max(1, round(k * n_iters / max(1, cfg.steps))) for k in range(1, max(1, cfg.steps) + 1)}
    tau0, tau1 = cfg.gumbel_tau

    def soft_latency(p: dict) -> torch.Tensor:
        lat = torch.zeros((), device=device) + shell
        for i in range(spec["depth"]):
            blk = ms[f"b{i}.block"].sum()
            for d in DIMS:
                k = f"b{i}.{d}"
                if k in p:
                    blk = blk - (ms[k] * (1 - p[k])).sum()
            lat = lat + (p[f"b{i}.block"].squeeze() if f"b{i}.block" in p else 1.0) * blk
        if "embed" in p:
            lat = lat - (ms["embed"] * (1 - p["embed"])).sum()
        return lat

    student.train()
    for it in range(1, n_iters + 1):
        x, y = batches()
        if uvc:
            tau = tau0 * (tau1 / tau0) ** ((it - 1) / max(1, n_iters - 1))
            p = {k: torch.sigmoid(v) for k, v in logits.items()}
            for k, v in logits.items():  # a Gumbel-sigmoid sample (logistic noise) per gate
                u = torch.rand(v.shape, generator=gen, device=device).clamp_(1e-6, 1 - 1e-6)
                sample = torch.sigmoid((v + torch.log(u) - torch.log1p(-u)) / tau)
                if k.endswith(".block"):
                    student.blocks[int(k[1:].split(".")[0])].gate = sample
                else:
                    _set_gate(student, k, sample)
            soft = soft_latency(p)
            viol = (soft - budget) / T
            loss = kd(student, x, y) + lam * viol
            aux = {"soft_cost": float(soft.detach()), "lambda": lam}
        else:
            l1 = sum((ms[k] / T * masks[k]).sum() for k in width_keys)
            loss = kd(student, x, y) + cfg.slim_l1 * l1
            aux = {"l1": float(l1.detach())}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if uvc:
            lam = max(0.0, lam + cfg.dual_lr * float(viol.detach()))
        else:
            with torch.no_grad():
                for m in masks.values():
                    m.clamp_(0.0, 1.0)
        if it in log_at:  # search.steps progress records, the last at the end
            if not uvc:  # the masks' range after the clamp (ViT-Slim keeps them in [0, 1])
                aux["mask_min"] = min(float(m.detach().min()) for m in masks.values())
                aux["mask_max"] = max(float(m.detach().max()) for m in masks.values())
            vals = _values(gates if uvc else {**gates, **masks}, logits if uvc else None, width_keys)
            bk = _block_keep(logits, spec, cfg.min_blocks) if skip else None
            hard = plan_from_values(spec, vals, 0.5, fl, e_min, cfg.align, bk) if uvc else \
                threshold_to_budget(spec, vals, cost, budget, fl, e_min, cfg.align)[0]
            rec = {"step": len(history), "iter": it, "cost": cost.predict(hard), "val_top1": None, "removed": None,
                   "s": round(time.time() - t0, 1), **aux}
            history.append(rec)
            log(f"[search] {cfg.strategy} iter {it}/{n_iters}: hard plan {rec['cost']:.3f} {cost.unit} "
                + (f"(soft {aux['soft_cost']:.3f}, lambda {lam:.3f}, tau {tau:.3f})" if uvc else
                   f"(at the budget's threshold; l1 {aux['l1']:.4f})"))

    # the hard plan
    if unscale is not None:  # the mask is folded below (or the search fails): the weights' own tensors back
        unscale()
    vals = _values(gates if uvc else {**gates, **masks}, logits if uvc else None, width_keys)
    repair = 0
    if uvc:
        bk = _block_keep(logits, spec, cfg.min_blocks) if skip else None
        plan = plan_from_values(spec, vals, 0.5, fl, e_min, cfg.align, bk)
        soft_final = float(soft_latency({k: torch.sigmoid(v) for k, v in logits.items()}))
        realised = cost.predict(plan)
        if realised > budget + 1e-9:  # rounding to aligned widths and p >= 0.5 can overshoot: repair
            scores = {k: v.detach().cpu() for k, v in vals.items()}
            for i in range(spec["depth"]):
                scores[f"b{i}.block"] = torch.sigmoid(logits[f"b{i}.block"]).detach().cpu() if skip else \
                    torch.full((1,), float("inf"))
            for k in ("embed", *[f"b{i}.{d}" for i in range(spec["depth"]) for d in DIMS]):
                scores.setdefault(k, torch.ones(len(masks_from_plan(full)[k])))
            plan, removed = prune_to(plan, scores, cost, budget, "knapsack", cfg, e_min)
            repair = len(removed)
        gap = {"soft": soft_final, "realised": realised, "after_repair": cost.predict(plan), "repair_groups": repair,
               "gap_pct": 100 * (realised - soft_final) / soft_final}
        log(f"[search] uvc: soft latency {soft_final:.3f} {cost.unit}, realised plan {realised:.3f} "
            f"({gap['gap_pct']:+.1f}%)" + (f"; repaired by removing {repair} groups -> {cost.predict(plan):.3f}"
                                          if repair else ""))
        for i, blk in enumerate(student.blocks):  # back to deterministic gates for the adaptation
            blk.gate = None
    else:
        plan, thr = threshold_to_budget(spec, vals, cost, budget, fl, e_min, cfg.align)
        gap = {"threshold": thr}
    if cost.predict(plan) > budget + 1e-9:
        raise UserError("search", f"{cfg.strategy} could not reach the budget {budget:.3f} {cost.unit}; stopped at "
                        f"{cost.predict(plan):.3f}", "raise the budget, lower the floors or use strategy knapsack")
    # slim: fold the masks' values (embedding included) into the weights, so the network handed on is the
    # masked one at the plan; uvc's gates were (near-)binary samples, so a kept unit's gate is 1. Then adapt
    # with hard 0/1 gates.
    if not uvc:
        with torch.no_grad():
            for m in masks.values():
                m.requires_grad_(False)
            fold_masks(student, masks)
    detach_gates(student)
    attach_gates(student, masks_from_plan(plan))
    kd_adapt(student, kd, batches, opt, cfg.kd_iters)
    acc = _val_top1(student, val_ds, workers=workers)
    history.append({"step": len(history), "cost": cost.predict(plan), "val_top1": acc, "removed": None,
                    "s": round(time.time() - t0, 1), **gap})
    log(f"[search] {cfg.strategy}: plan {cost.predict(plan):.3f} {cost.unit} (budget {budget:.3f}), val top-1 after "
        f"{cfg.kd_iters} KD steps with hard masks {acc:.2f}%")
    detach_gates(student)
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    plan.meta = {"strategy": cfg.strategy, "budget": budget, "unit": cost.unit, "predicted": cost.predict(plan),
                 "budget_desc": desc, **({"uvc": gap} if uvc else {"slim_threshold": gap["threshold"]})}
    return SearchResult(plan.validate(fl), state, history, budget, cost.unit, desc, time.time() - t0)


def _set_gate(model: CompactViT, key: str, value: torch.Tensor) -> None:
    if key == "embed":
        model.gate_embed = value
        return
    j, dim = key[1:].split(".")
    blk = model.blocks[int(j)]
    if dim == "mlp":
        blk.mlp.gate = value
    else:
        setattr(blk.attn, {"heads": "gate_head", "qk": "gate_qk", "v": "gate_v"}[dim], value)


def _values(gates: dict, logits: dict | None, keys: list[str]) -> dict:
    """Per-unit keep values: the masks (slim) or the gate probabilities (uvc); 1 for dims not searched."""
    out = {}
    for k, g in gates.items():
        if k.endswith(".block"):
            continue
        if k in keys:
            out[k] = (torch.sigmoid(logits[k]) if logits is not None else g).detach().cpu()
        else:
            out[k] = torch.full(g.shape, math.inf)
    return out


def _block_keep(logits: dict, spec: dict, min_blocks: int) -> list[bool]:
    p = [float(torch.sigmoid(logits[f"b{i}.block"].detach())) for i in range(spec["depth"])]
    keep = [q >= 0.5 for q in p]
    if sum(keep) < min_blocks:  # the most probable blocks up to the floor
        for i in sorted(range(len(p)), key=lambda i: -p[i])[:min_blocks]:
            keep[i] = True
    return keep
