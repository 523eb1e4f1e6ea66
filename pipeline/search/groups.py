"""Prunable groups and plan surgery: what a search removes, and how a Plan changes when it does.

A *group* is a set of units the search removes at once. :class:`GroupKey` names
it (typed, hashable, never a formatted string):

* a block's width dim (:data:`WIDTH_DIMS`: ``heads``, ``qk``, ``v``, ``mlp``),
  ``GroupKey("mlp", 3)``;
* a whole block (UVC's skip), ``GroupKey("block", 3)``;
* the embedding channels, :data:`EMBED`;
* a token merge of a given ``type`` (the Plan's word for it: ``w``, ``h`` or
  ``hw``) at the boundary before a block, ``GroupKey("merge", 3, "hw")`` (CAIT).

``dim`` takes the same values as the latency table's
(:data:`vitrim.profiling.table.DIMS`), so a key is what
:meth:`~vitrim.profiling.table.LatencyTable.marginal` prices. Scores, gates and
masks are dicts keyed by GroupKey. A :class:`Candidate` is one removal the
selection weighs: a key, the units it removes, their saliency and the saving.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import MERGE_TYPES, BlockPlan, Floors, Plan

WIDTH_DIMS = ("heads", "qk", "v", "mlp")  # the per-block widths (a BlockPlan's fields)


@dataclass(frozen=True)
class GroupKey:
    """One prunable group: ``dim`` (a width dim, ``block``, ``embed`` or ``merge``), its block, its merge type."""

    dim: str
    block: Optional[int] = None
    type: Optional[str] = None  # dim "merge" only: the merge type, as the Plan spells it

    def __post_init__(self) -> None:
        if self.dim not in (*WIDTH_DIMS, "block", "embed", "merge"):
            raise ValueError(f"unknown group dim {self.dim!r}")
        if (self.block is None) != (self.dim == "embed"):
            raise ValueError(f"group {self.dim!r} {'has no' if self.dim == 'embed' else 'needs a'} block")
        if (self.type is not None) != (self.dim == "merge") or (self.type is not None and self.type not in MERGE_TYPES):
            raise ValueError(f"group {self.dim!r}: merge type {self.type!r}")

    def __str__(self) -> str:  # for logs and records only: code never parses it
        if self.dim == "embed":
            return "embed"
        return f"b{self.block}.{self.dim}" + (f":{self.type}" if self.type else "")


EMBED = GroupKey("embed")


def width_keys(depth: int) -> list[GroupKey]:
    """The width groups of every block, block by block."""
    return [GroupKey(d, i) for i in range(depth) for d in WIDTH_DIMS]


def full_widths(spec: dict) -> dict[str, int]:
    """Each width dim's size in the teacher."""
    return {"heads": spec["num_heads"], "qk": spec["head_dim"], "v": spec["head_dim"], "mlp": spec["mlp_hidden"]}


@dataclass
class Candidate:
    """A removal (or, put back, an addition) the selection weighs."""

    key: GroupKey
    units: list[int]
    saliency: float
    saved: float = 0.0
    snapshot: Optional[BlockPlan] = None  # a removed block's widths, to restore it

    @property
    def block(self) -> Optional[int]:
        return self.key.block

    @property
    def dim(self) -> str:
        return self.key.dim

    @property
    def type(self) -> Optional[str]:
        return self.key.type


# ---------------------------------------------------------------------------
# Plan surgery


def apply_removal(plan: Plan, key: GroupKey, n: int = 0, units: Optional[list[int]] = None) -> Plan:
    """A copy of ``plan`` without ``units`` of group ``key`` (any ``n`` of them when ``units`` is None);
    a merge key: with that token merge added."""
    p = plan.copy()
    if key.dim == "merge":
        return p.set_merges({**p.merges, key.block: key.type}).validate()
    if key.dim == "embed":
        keep = p.embed_keep
        drop = set(units) if units is not None else set(keep[-n:])
        p.embed_keep = [i for i in keep if i not in drop]
        return p
    b = p.blocks[key.block]
    if key.dim == "block":
        p.blocks[key.block] = BlockPlan(False)
        return p
    cur = getattr(b, key.dim)
    drop = set(units) if units is not None else set(cur[-n:])
    setattr(b, key.dim, [i for i in cur if i not in drop])
    return p


def apply_addition(plan: Plan, c: Candidate) -> Optional[Plan]:
    """``plan`` with a removed group put back, or None when it cannot be (its block is gone)."""
    p = plan.copy()
    if c.dim == "merge":
        if p.merges.get(c.block) != c.type:
            return None
        # later merges see a bigger grid, which merges wherever the smaller one did: always valid
        return p.set_merges({i: t for i, t in p.merges.items() if i != c.block})
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


def masks_from_plan(plan: Plan) -> dict[GroupKey, torch.Tensor]:
    """0/1 gate values of every group (the embedding, each block's widths, each block) at ``plan``."""
    s = plan.spec
    m = {EMBED: torch.zeros(s["embed_dim"])}
    m[EMBED][plan.embed_keep] = 1
    for i, b in enumerate(plan.blocks):
        for dim, n in full_widths(s).items():
            t = torch.zeros(n)
            if b.keep:
                t[getattr(b, dim)] = 1
            m[GroupKey(dim, i)] = t
        m[GroupKey("block", i)] = torch.ones(1) if b.keep else torch.zeros(1)
    return m


# ---------------------------------------------------------------------------
# Candidates


def merge_options(plan: Plan, max_merges: int, min_tokens: int) -> list[GroupKey]:
    """Every token merge that can be added to ``plan``: a free boundary, a grid side to halve, at most
    ``max_merges`` merges, no block below ``min_tokens`` (the LUT's token axis)."""
    if len(plan.merges) >= max_merges:
        return []
    out = []
    for i in range(len(plan.blocks)):
        if i in plan.merges:
            continue
        for t in MERGE_TYPES:
            p = plan.copy().set_merges({**plan.merges, i: t})
            try:
                p.check_tokens("merge")
            except UserError:
                continue
            if min(p.block_tokens()) >= min_tokens:
                out.append(GroupKey("merge", i, t))
    return out


def candidates(plan: Plan, scores: dict, fl: Floors, e_min: int, min_blocks: int, align: int,
               allow_embed: bool, allow_blocks: bool, merges: Optional[dict] = None, max_merges: int = 0,
               min_tokens: int = 1) -> list[Candidate]:
    """The cheapest group of every (block, width dim), plus whole blocks, embedding channels and, given
    ``merges`` ({merge key: saliency}), the token merges still possible."""
    out = []
    if merges:
        out += [Candidate(k, [], float(merges[k])) for k in merge_options(plan, max_merges, min_tokens) if k in merges]
    kept = plan.kept_blocks
    for i in kept:
        b = plan.blocks[i]
        for dim in WIDTH_DIMS:
            alive = getattr(b, dim)
            step = 1 if dim == "heads" else (len(alive) % align or align)
            if len(alive) - step < getattr(fl, dim):  # Floors has a field per width dim
                continue
            key = GroupKey(dim, i)
            sc = scores[key]
            units = sorted(alive, key=lambda u: (float(sc[u]), u))[:step]
            out.append(Candidate(key, sorted(units), float(sum(sc[u] for u in units))))
        if allow_blocks and len(kept) > min_blocks:
            key = GroupKey("block", i)
            out.append(Candidate(key, [], float(scores[key].sum())))
    if allow_embed:
        alive = plan.embed_keep
        step = len(alive) % align or align
        if len(alive) - step >= e_min:
            sc = scores[EMBED]
            units = sorted(alive, key=lambda u: (float(sc[u]), u))[:step]
            out.append(Candidate(EMBED, sorted(units), float(sum(sc[u] for u in units))))
    return out
