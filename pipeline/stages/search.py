"""Latency-aware structural search (NViT-style), with UVC block skipping.

Loop: score every prunable group with Hessian-aware saliency
(:mod:`vitrim.pipeline.stages.saliency`), remove the cheapest groups until the step's latency
target is met, fine-tune briefly with KD so the weights keep adapting, repeat
until ``cost(plan) <= budget``. Latency comes from a measured LUT
(:mod:`vitrim.profiling.table`); FLOPs/params budgets are supported for comparison with
UVC and ViT-Slim.

Groups: heads (1 at a time), QK and V dims shared across a block's heads,
MLP neurons and embedding channels (``align`` units at a time, so widths stay
multiples of 8 for the target's fast kernels), whole blocks (UVC), and, with
``search.prune_tokens``, token merges ("merge type T before block i", CAIT):
their saliency is the KD-loss change of applying the merge, measured directly
(:func:`vitrim.pipeline.stages.saliency.merge_scores`), and their saving is the
LUT's prediction with every later block at the merged token count.

Selection strategies (same interface):

* ``knapsack`` (HALP, Shen et al. 2022): remove the group with the least
  importance per ms saved.
* ``nvit``: remove the group with the lowest ``S/mean(S) - eta * dLat/mean(dLat)``
  (NViT's latency-regularised score).

Both rank only groups whose predicted saving is positive: a group that saves
no time (a flat or non-monotone LUT entry) is never removed while one that
saves time exists.
* ``magnitude``: the knapsack loop with L1 weight magnitude instead of saliency
  (width pruning only: L1 of a whole block has no comparable scale).
* ``uniform``: one width fraction for every block (units ranked by L1), no skipping.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import DEFAULT_BUDGET_FRACTION, RunConfig, SearchConfig, validate_search
from vitrim.pipeline.core.data import make_loader
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.stages.saliency import attach_gates, detach_gates, hessian_scores, magnitude_scores, merge_scores

DIMS = ("heads", "qk", "v", "mlp")


# ---------------------------------------------------------------------------
# Costs: latency (LUT), MACs, params


class Cost:
    """What the budget is measured in. ``predict(plan)`` and ``saved(plan, removal)``."""

    unit = ""

    def predict(self, plan: Plan) -> float:
        raise NotImplementedError

    def saved(self, plan: Plan, block: Optional[int], dim: str, n: int, kind: str = "hw") -> float:
        after = apply_removal(plan, block, dim, n, kind=kind)
        return self.predict(plan) - self.predict(after)


class LatencyCost(Cost):
    unit = "ms"

    def __init__(self, lut):
        self.lut = lut

    def predict(self, plan: Plan) -> float:
        return self.lut.predict(plan)

    def saved(self, plan: Plan, block: Optional[int], dim: str, n: int, kind: str = "hw") -> float:
        return self.lut.marginal(plan, block, dim, groups=1, group_size=n if dim != "block" else 1, merge_type=kind)


class MacsCost(Cost):
    unit = "MMACs"

    def predict(self, plan: Plan) -> float:
        return plan.macs() / 1e6


class ParamsCost(Cost):
    unit = "Mparams"

    def predict(self, plan: Plan) -> float:
        return plan.num_params() / 1e6


def resolve_budget(cfg: SearchConfig, lut) -> tuple[Cost, float, str]:
    """(cost model, budget in its unit, description). Two budgets at once are refused."""
    validate_search(cfg, "search config")
    full = Plan.full(lut.spec)
    if cfg.flops_fraction is not None:
        c = MacsCost()
        return c, cfg.flops_fraction * c.predict(full), f"{cfg.flops_fraction:.0%} of the teacher's MACs"
    if cfg.params_fraction is not None:
        c = ParamsCost()
        return c, cfg.params_fraction * c.predict(full), f"{cfg.params_fraction:.0%} of the teacher's params"
    c = LatencyCost(lut)
    if cfg.budget_ms is not None:
        return c, cfg.budget_ms, f"{cfg.budget_ms:.3f} ms"
    frac = DEFAULT_BUDGET_FRACTION if cfg.budget_fraction is None else cfg.budget_fraction
    return c, frac * c.predict(full), f"{frac:.0%} of the teacher's predicted latency"


# what a strategy never removes, whatever the config says (magnitude: L1 of a whole block has no scale
# comparable with a width group's; slim: its masks are on widths only). uniform is not corrected afterwards.
STRATEGY_CONSTRAINTS = {"magnitude": {"prune_blocks": False}, "slim": {"prune_blocks": False}}


def searched_config(cfg: SearchConfig) -> SearchConfig:
    """``cfg`` as its strategy searches under it: with the strategy's constraints applied.

    Everything that changes a strategy's plan afterwards (the closed loop's corrections) uses this
    same configuration, so a width-only baseline stays width-only.
    """
    import dataclasses

    fixed = {k: v for k, v in STRATEGY_CONSTRAINTS.get(cfg.strategy, {}).items() if getattr(cfg, k) != v}
    return dataclasses.replace(cfg, **fixed) if fixed else cfg


# ---------------------------------------------------------------------------
# Plan surgery


def apply_removal(plan: Plan, block: Optional[int], dim: str, n: int, units: Optional[list[int]] = None,
                  kind: str = "hw") -> Plan:
    """A copy of ``plan`` without ``units`` of ``dim`` (any ``n`` of them when ``units`` is None);
    ``dim`` merge: with a token merge of type ``kind`` before ``block``."""
    p = plan.copy()
    if dim == "merge":
        return p.set_merges({**p.merges, block: kind}).validate()
    if dim == "embed":
        keep = p.embed_keep
        drop = set(units) if units is not None else set(keep[-n:])
        p.embed_keep = [i for i in keep if i not in drop]
        return p
    b = p.blocks[block]
    if dim == "block":
        p.blocks[block] = BlockPlan(False)
        return p
    cur = getattr(b, dim)
    drop = set(units) if units is not None else set(cur[-n:])
    setattr(b, dim, [i for i in cur if i not in drop])
    return p


def floor_plan(spec: dict, fl: Floors, e_min: int, min_blocks: int, align: int) -> Plan:
    """The smallest plan the search may reach (latency lower bound)."""
    def aligned(floor: int, full: int) -> int:
        return min(full, max(floor, align))

    blocks = []
    for i in range(spec["depth"]):
        if i < min_blocks:
            blocks.append(BlockPlan(True, list(range(fl.heads)), list(range(aligned(fl.qk, spec["head_dim"]))),
                                    list(range(aligned(fl.v, spec["head_dim"]))),
                                    list(range(aligned(fl.mlp, spec["mlp_hidden"])))))
        else:
            blocks.append(BlockPlan(False))
    return Plan(spec=dict(spec), embed_keep=list(range(e_min)), blocks=blocks)


def masks_from_plan(plan: Plan) -> dict:
    s = plan.spec
    m = {"embed": torch.zeros(s["embed_dim"])}
    m["embed"][plan.embed_keep] = 1
    for i, b in enumerate(plan.blocks):
        for dim, n in (("heads", s["num_heads"]), ("qk", s["head_dim"]), ("v", s["head_dim"]), ("mlp", s["mlp_hidden"])):
            t = torch.zeros(n)
            if b.keep:
                t[getattr(b, dim)] = 1
            m[f"b{i}.{dim}"] = t
        m[f"b{i}.block"] = torch.ones(1) if b.keep else torch.zeros(1)
    return m


# ---------------------------------------------------------------------------
# Selection


@dataclass
class Candidate:
    block: Optional[int]
    dim: str
    units: list[int]
    saliency: float
    saved: float = 0.0
    snapshot: Optional[BlockPlan] = None  # a removed block's widths, to restore it
    kind: str = ""  # dim merge: the merge type


def merge_options(plan: Plan, max_merges: int, min_tokens: int) -> list[tuple[int, str]]:
    """(block, type) of every token merge that can be added to ``plan``: a free boundary, a grid side
    to halve, at most ``max_merges`` merges, no block below ``min_tokens`` (the LUT's token axis)."""
    from vitrim.pipeline.core.plan import MERGE_TYPES

    if len(plan.merges) >= max_merges:
        return []
    out = []
    for i in range(len(plan.blocks)):
        if i in plan.merges:
            continue
        for kind in MERGE_TYPES:
            p = plan.copy().set_merges({**plan.merges, i: kind})
            try:
                p.check_tokens("merge")
            except UserError:
                continue
            if min(p.block_tokens()) >= min_tokens:
                out.append((i, kind))
    return out


def candidates(plan: Plan, scores: dict, fl: Floors, e_min: int, min_blocks: int, align: int,
               allow_embed: bool, allow_blocks: bool, merges: Optional[dict] = None, max_merges: int = 0,
               min_tokens: int = 1) -> list[Candidate]:
    """The cheapest group of every (block, dim), plus whole blocks, embedding channels and, given
    ``merges`` ({(block, type): saliency}), the token merges still possible."""
    out = []
    if merges:
        out += [Candidate(i, "merge", [], float(merges[(i, k)]), kind=k)
                for i, k in merge_options(plan, max_merges, min_tokens) if (i, k) in merges]
    floors = {"heads": fl.heads, "qk": fl.qk, "v": fl.v, "mlp": fl.mlp}
    kept = plan.kept_blocks
    for i in kept:
        b = plan.blocks[i]
        for dim in DIMS:
            alive = getattr(b, dim)
            step = 1 if dim == "heads" else (len(alive) % align or align)
            if len(alive) - step < floors[dim]:
                continue
            sc = scores[f"b{i}.{dim}"]
            units = sorted(alive, key=lambda u: (float(sc[u]), u))[:step]
            out.append(Candidate(i, dim, sorted(units), float(sum(sc[u] for u in units))))
        if allow_blocks and len(kept) > min_blocks:
            out.append(Candidate(i, "block", [], float(scores[f"b{i}.block"].sum())))
    if allow_embed:
        alive = plan.embed_keep
        step = len(alive) % align or align
        if len(alive) - step >= e_min:
            sc = scores["embed"]
            units = sorted(alive, key=lambda u: (float(sc[u]), u))[:step]
            out.append(Candidate(None, "embed", sorted(units), float(sum(sc[u] for u in units))))
    return out


def prune_to(plan: Plan, scores: dict, cost: Cost, target: float, strategy: str, cfg: SearchConfig,
             e_min: int, merges: Optional[dict] = None, min_tokens: int = 1) -> tuple[Plan, list[Candidate]]:
    """Greedily remove groups until ``cost.predict(plan) <= target``.

    ``merges``: {(block, type): saliency} of token merges to consider (``search.prune_tokens``)."""
    fl = Floors(cfg.min_heads, cfg.min_qk, cfg.min_v, cfg.min_mlp)
    removed: list[Candidate] = []
    norm_s = norm_l = None
    while cost.predict(plan) > target:
        cands = candidates(plan, scores, fl, e_min, cfg.min_blocks, cfg.align, cfg.prune_embed, cfg.prune_blocks,
                           merges, cfg.max_merges, min_tokens)
        if not cands:
            break
        for c in cands:
            c.saved = cost.saved(plan, c.block, c.dim, len(c.units) or 1, kind=c.kind or "hw")
        # A group that saves no time is never taken while one that does exists: with a noisy,
        # non-monotone LUT a near-dead group of zero or negative saving would otherwise win the
        # ratio below (0/0-ish) and the loop would then fall back to the biggest saving, whatever
        # its importance. Ranking only the groups that save time keeps importance per ms saved
        # the criterion all the way down.
        cands = [c for c in cands if c.saved > 0]
        if not cands:
            break  # nothing left saves time; run_search reports the unreachable budget
        if strategy == "nvit":
            if norm_s is None:
                norm_s = sum(c.saliency for c in cands) / len(cands) or 1.0
                norm_l = sum(c.saved for c in cands) / len(cands) or 1.0
            key = lambda c: c.saliency / norm_s - cfg.eta * c.saved / norm_l  # noqa: E731
        else:  # knapsack (HALP): least importance per unit of latency saved
            key = lambda c: c.saliency / c.saved  # noqa: E731
        # equal keys (e.g. several free groups): the bigger saving first, then a fixed order
        best = min(cands, key=lambda c: (key(c), -c.saved, c.block if c.block is not None else -1, c.dim))
        if best.dim == "block":
            b = plan.blocks[best.block]
            best.snapshot = BlockPlan(True, list(b.heads), list(b.qk), list(b.v), list(b.mlp))
        plan = apply_removal(plan, best.block, best.dim, len(best.units), best.units or None, kind=best.kind or "hw")
        removed.append(best)
    return plan, removed


def apply_addition(plan: Plan, c: Candidate) -> Optional[Plan]:
    """``plan`` with a removed group put back, or None when it cannot be (its block is gone)."""
    p = plan.copy()
    if c.dim == "merge":
        if p.merges.get(c.block) != c.kind:
            return None
        # later merges see a bigger grid, which merges wherever the smaller one did: always valid
        return p.set_merges({i: k for i, k in p.merges.items() if i != c.block})
    if c.dim == "embed":
        if set(c.units) & set(p.embed_keep):
            return None
        p.embed_keep = sorted(p.embed_keep + c.units)
        return p
    b = p.blocks[c.block]
    if c.dim == "block":
        if b.keep or c.snapshot is None:
            return None
        s = c.snapshot
        p.blocks[c.block] = BlockPlan(True, list(s.heads), list(s.qk), list(s.v), list(s.mlp))
        return p
    cur = getattr(b, c.dim)
    if not b.keep or set(c.units) & set(cur):
        return None
    setattr(b, c.dim, sorted(cur + c.units))
    return p


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


def uniform_plan(teacher_state_model: CompactViT, spec: dict, cost: Cost, budget: float, cfg: SearchConfig) -> Plan:
    """One width fraction for every block's heads, QK, V and MLP (units ranked by L1)."""
    mags = magnitude_scores(teacher_state_model)
    fl = Floors(cfg.min_heads, cfg.min_qk, cfg.min_v, cfg.min_mlp)
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
                sc = mags[f"b{i}.{dim}"]
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


# ---------------------------------------------------------------------------
# The search loop


@dataclass
class SearchResult:
    plan: Plan
    state: dict  # adapted full-size weights (canonical naming), sliceable with the plan
    log: list = field(default_factory=list)
    budget: float = 0.0
    unit: str = "ms"
    budget_desc: str = ""
    wall_s: float = 0.0


class BatchStream:
    """An endless stream of shuffled training batches on ``device`` (a new epoch order when one runs out)."""

    def __init__(self, ds, batch_size: int, seed: int, device: str, workers: int = 0):
        self.make = lambda ep: make_loader(ds, batch_size, shuffle=True, seed=seed, drop_last=True, epoch=ep,
                                           workers=workers, pin_memory=str(device).startswith("cuda"))
        self.epoch, self.device = 0, device
        self.it = iter(self.make(0))

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.it = iter(self.make(self.epoch))
            x, y = next(self.it)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def kd_adapt(student: nn.Module, kd, next_batch: Callable, opt, iters: int) -> None:
    """``iters`` KD steps on the (gated) student, then eval mode: the search's short adaptation."""
    student.train()
    for _ in range(iters):
        x, y = next_batch()
        loss = kd(student, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    student.eval()


def _val_top1(model: nn.Module, val_ds, n: int = 2000, workers: int = 0) -> float:
    from vitrim.pipeline.core.data import TensorImages
    from vitrim.pipeline.core.evaluate import top1

    ds = val_ds.subset(torch.arange(min(n, len(val_ds)))) if isinstance(val_ds, TensorImages) else val_ds
    return top1(model, ds, 512, workers=workers)


def run_search(teacher: nn.Module, student: CompactViT, lut, cfg: SearchConfig, train_ds, val_ds,
               batch_size: int = 128, kd_alpha: float = 1.0, kd_T: float = 2.0,
               log: Callable[[str], None] = print, device: str = "cpu", workers: int = 0) -> SearchResult:
    """Search a plan for ``student`` (a keep-everything CompactViT of ``teacher``) under the budget.

    Saliency, the KD steps and the validation run on ``device`` (a GPU when the config has one);
    the returned weights are on the CPU.
    """
    from vitrim.pipeline.stages.distill import make_kd_fn

    cfg = searched_config(cfg)
    if cfg.strategy in ("slim", "uvc"):  # learned masks (issue 17)
        from vitrim.pipeline.stages.masks import run_mask_search

        return run_mask_search(teacher, student, lut, cfg, train_ds, val_ds, batch_size, kd_alpha, kd_T, log=log,
                               device=device, workers=workers)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    spec = lut.spec
    cost, budget, desc = resolve_budget(cfg, lut)
    e_min = lut.grid.embed[0] if cfg.prune_embed else spec["embed_dim"]
    fl = Floors(cfg.min_heads, cfg.min_qk, cfg.min_v, cfg.min_mlp)
    if cfg.prune_tokens and len(lut.grid.tokens) < 2:
        raise UserError("search", f"search.prune_tokens needs a LUT with a token axis; this one has tokens "
                        f"{lut.grid.tokens}", "rebuild it with `vitrim profile build` on this config (prune_tokens on)")
    min_tokens = lut.grid.tokens[0] if cfg.prune_tokens else Plan.full(spec).num_tokens
    smallest = floor_plan(spec, fl, e_min, cfg.min_blocks if cfg.prune_blocks else spec["depth"], cfg.align)
    while True:  # the floor with the merges that save the most (greedy)
        opts = merge_options(smallest, cfg.max_merges, min_tokens) if cfg.prune_tokens else []
        if not opts:
            break
        smallest = min((apply_removal(smallest, i, "merge", 0, kind=k) for i, k in opts), key=cost.predict)
    lower = cost.predict(smallest)
    full = Plan.full(spec)
    start = cost.predict(full)
    if budget < lower:
        raise UserError("search", f"budget {budget:.3f} {cost.unit} ({desc}) is below the smallest reachable "
                        f"{lower:.3f} {cost.unit} (floors: heads>={fl.heads}, QK>={fl.qk}, V>={fl.v}, MLP>={fl.mlp}, "
                        f"embed>={e_min}, blocks>={cfg.min_blocks}"
                        + (f", tokens>={min_tokens} in <={cfg.max_merges} merges" if cfg.prune_tokens else "") + ")",
                        f"raise the budget above {lower:.3f} {cost.unit} or lower the floors")
    log(f"[search] {cfg.strategy}: teacher {start:.3f} {cost.unit} -> budget {budget:.3f} {cost.unit} ({desc})")
    rec = {"step": 0, "cost": start, "val_top1": None, "removed": 0, "s": 0.0}
    history = [rec]
    if cfg.strategy == "uniform":
        plan = uniform_plan(student, spec, cost, budget, cfg)
        history.append({"step": 1, "cost": cost.predict(plan), "val_top1": None, "removed": None,
                        "s": round(time.time() - t0, 1)})
        plan.meta = {"strategy": "uniform", "budget": budget, "unit": cost.unit, "predicted": cost.predict(plan)}
        return SearchResult(plan, {k: v.clone() for k, v in student.state_dict().items()}, history, budget, cost.unit,
                            desc, time.time() - t0)
    teacher.to(device).eval()
    student.to(device)
    kd = make_kd_fn(teacher, kd_alpha, kd_T)
    plan = full
    opt = torch.optim.AdamW([p for p in student.parameters()], lr=cfg.lr, weight_decay=0.0)
    steps = max(1, cfg.steps)
    next_batch = BatchStream(train_ds, batch_size, cfg.seed, device, workers)

    removed_all: list[Candidate] = []
    merge_log = []
    for step in range(1, steps + 1):
        target = start * (budget / start) ** (step / steps)
        if step == steps:
            target = budget
        masks = masks_from_plan(plan)
        gates = attach_gates(student, masks)
        student.set_token_merges(plan.merges)
        merges = None
        if cfg.strategy == "magnitude":
            raw = magnitude_scores(student)
            scores = {k: v / (v.mean() + 1e-12) for k, v in raw.items()}  # per-group relative magnitude
        else:
            batches = [next_batch() for _ in range(cfg.saliency_batches)]
            scores = hessian_scores(student, gates, kd, batches)
            if cfg.prune_tokens:
                options = merge_options(plan, cfg.max_merges, min_tokens)
                groups = candidates(plan, scores, fl, e_min, cfg.min_blocks, cfg.align, cfg.prune_embed, cfg.prune_blocks)
                merges, info = merge_scores(student, gates, kd, batches, plan.merges, options, groups)
                merge_log.append({"step": step, **info})
        plan, removed = prune_to(plan, scores, cost, target, "nvit" if cfg.strategy == "nvit" else "knapsack", cfg, e_min,
                                 merges, min_tokens)
        removed_all += removed
        added = []
        if step == steps and cfg.refill:
            plan, added = refill(plan, removed_all, cost, budget)
        gates = attach_gates(student, masks_from_plan(plan))
        student.set_token_merges(plan.merges)
        kd_adapt(student, kd, next_batch, opt, cfg.kd_iters)
        acc = _val_top1(student, val_ds, workers=workers)
        c = cost.predict(plan)
        counts = {}
        for r in removed:
            counts[r.dim] = counts.get(r.dim, 0) + 1
        rec = {"step": step, "target": target, "cost": c, "val_top1": acc, "removed": counts, "s": round(time.time() - t0, 1)}
        if cfg.prune_tokens:
            rec["merges"] = {str(i): k for i, k in plan.merges.items()}
            rec["tokens"] = plan.block_tokens()
        if added:
            rec["refilled"] = len(added)
        history.append(rec)
        log(f"[search] step {step}/{steps}: {c:.3f} {cost.unit} (target {target:.3f}), removed {counts}"
            + (f", put back {len(added)} groups to fill the budget" if added else "") + f", val top-1 {acc:.2f}%")
    if cost.predict(plan) > budget + 1e-9:
        raise UserError("search", f"could not reach the budget {budget:.3f} {cost.unit}; stopped at "
                        f"{cost.predict(plan):.3f}", "raise the budget, lower the floors or allow block/embed pruning")
    detach_gates(student)
    student.set_token_merges({})
    # zero nothing: slicing drops pruned units; keep adapted weights for the slice stage
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    plan.meta = {"strategy": cfg.strategy, "budget": budget, "unit": cost.unit, "predicted": cost.predict(plan),
                 "budget_desc": desc}
    if merge_log:
        plan.meta["merge_saliency"] = merge_log
    return SearchResult(plan.validate(fl), state, history, budget, cost.unit, desc, time.time() - t0)


def plot_widths(plan: Plan, path, title: str = "") -> None:
    """NViT's 'parameter redistribution' picture: kept fraction per block and dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vitrim.pipeline.core.io import atomic_save

    s = plan.spec
    full = {"heads": s["num_heads"], "qk": s["head_dim"], "v": s["head_dim"], "mlp": s["mlp_hidden"]}
    depth = len(plan.blocks)
    x = np.arange(depth)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    w = 0.2
    for k, dim in enumerate(DIMS):
        vals = [len(getattr(b, dim)) / full[dim] if b.keep else 0.0 for b in plan.blocks]
        ax.bar(x + (k - 1.5) * w, vals, w, label=f"{dim} (of {full[dim]})")
    for i, b in enumerate(plan.blocks):
        if not b.keep:
            ax.text(i, 0.02, "skipped", rotation=90, ha="center", va="bottom", fontsize=8)
    if plan.merges:  # token merges: the token count entering every block, on its own axis
        ax2 = ax.twinx()
        ax2.step(x, plan.block_tokens(), where="mid", color="k", lw=1.2, label="tokens")
        ax2.set_ylabel("tokens entering the block")
        ax2.set_ylim(0, plan.num_tokens * 1.05)
        for i, kind in plan.merges.items():
            ax2.annotate(f"merge {kind}", (i - 0.5, plan.block_tokens()[i]), fontsize=7, rotation=90, va="bottom")
    ax.set_xticks(x, [str(i) for i in range(depth)])
    ax.set_xlabel("block")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"kept widths per block (embed {plan.embed_dim}/{s['embed_dim']})", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def stage_search(cfg: RunConfig, teacher, lut, splits, out_dir: Path, log: Callable[[str], None] = print):
    """Search a plan; writes plan.json, search_log.json, widths.png and search_state.safetensors."""
    from vitrim.pipeline.core.io import atomic_write_json
    from vitrim.pipeline.core.models import save_weights
    from vitrim.pipeline.core.slicing import full_size_compact

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student, _ = full_size_compact(teacher)
    from vitrim.pipeline.core.device import resolve_device

    res = run_search(teacher, student, lut, cfg.search, splits.train, splits.val, batch_size=cfg.data.batch_size,
                     kd_alpha=cfg.finetune.alpha, kd_T=cfg.finetune.temperature, log=log,
                     device=resolve_device(cfg.device), workers=cfg.data.workers)
    teacher.cpu()
    res.plan.save(out_dir / "plan.json")
    atomic_write_json(out_dir / "search_log.json", {"strategy": cfg.search.strategy, "budget": res.budget,
                                                     "unit": res.unit, "budget_desc": res.budget_desc,
                                                     "wall_s": round(res.wall_s, 1), "steps": res.log})
    save_weights(res.state, out_dir / "search_state.safetensors")
    plot_widths(res.plan, out_dir / "widths.png", f"{cfg.search.strategy}: kept widths per block "
                f"(embed {res.plan.embed_dim}/{lut.spec['embed_dim']})")
    log(f"[search] done in {res.wall_s:.0f}s: predicted {lut.predict(res.plan):.3f} ms, "
        f"{res.plan.num_params() / 1e6:.3f}M params; wrote {out_dir / 'plan.json'}")
    return res
