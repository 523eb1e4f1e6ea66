"""Tiny teachers with planted structure, hand-written LUTs and search configs shared by the search tests."""
import copy

import numpy as np
import pytest
import timm
import torch

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig, SearchConfig
from vitrim.pipeline.core.distill import make_kd_fn
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.slicing import full_size_compact
from vitrim.pipeline.search import attach_gates, floor_plan, hessian_scores, masks_from_plan, run_search
from vitrim.profiling.table import Grid, LatencyTable, token_axis
from tests.conftest import TINY_KW, random_init

# the embedded default's layout: no class token, average pooling (so identical tokens merge losslessly)
POOL_KW = dict(TINY_KW, class_token=False, global_pool="avg")


def teacher(seed=0):
    return random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=seed, std=0.15)


def cfg(**kw):
    base = dict(steps=2, kd_iters=3, saliency_batches=2, budget_fraction=0.6, lr=1e-4)
    base.update(kw)
    return SearchConfig(**base)


def scores_for(t, data):
    student, _ = full_size_compact(t)
    gates = attach_gates(student)
    kd = make_kd_fn(copy.deepcopy(t), 1.0, 2.0)
    batches = [data.train[list(range(i * 64, (i + 1) * 64))] for i in range(2)]
    return hessian_scores(student, gates, kd, batches)


def scored(t, data, plan):
    """The gated student of ``t`` at ``plan``, its gates, the KD loss, two batches and the Hessian scores."""
    student, _ = full_size_compact(t)
    gates = attach_gates(student, masks_from_plan(plan))
    student.set_token_merges(plan.merges)
    kd = make_kd_fn(copy.deepcopy(t), 1.0, 2.0)
    batches = [data.train[list(range(i * 64, (i + 1) * 64))] for i in range(2)]
    scores = hessian_scores(student, gates, kd, batches)
    return student, gates, kd, batches, scores


def search(t, lut, data, c):
    student, _ = full_size_compact(t)
    return run_search(t, student, lut, c, data.train, data.val, batch_size=64, log=lambda m: None)


def kill_head(t, hd=16):
    """Head 1 of block 0 computes nothing (every weight and bias of its q, k, v and output is zero)."""
    with torch.no_grad():
        a = t.blocks[0].attn
        for part in range(3):
            rows = slice(part * 32 + hd, part * 32 + 2 * hd)
            a.qkv.weight[rows] = 0
            a.qkv.bias[rows] = 0
        a.proj.weight[:, hd:2 * hd] = 0
    return t


def identity_block(t, i=1):
    """Block ``i``'s residual branches add nothing: the block is the identity."""
    with torch.no_grad():
        for lin in (t.blocks[i].attn.proj, t.blocks[i].mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    return t


DEAD = list(range(8, 16))  # an aligned group of residual channels


def dead_channel_teacher(seed=7):
    """A tiny teacher in which every weight reading or writing channels DEAD is zero."""
    t = teacher(seed=seed)
    with torch.no_grad():
        t.patch_embed.proj.weight[DEAD] = 0
        t.patch_embed.proj.bias[DEAD] = 0
        t.cls_token[..., DEAD] = 0
        t.pos_embed[..., DEAD] = 0
        for ln in [t.norm] + [m for blk in t.blocks for m in (blk.norm1, blk.norm2)]:
            ln.weight[DEAD] = 0
            ln.bias[DEAD] = 0
        for blk in t.blocks:
            for lin in (blk.attn.qkv, blk.mlp.fc1):  # read the residual stream
                lin.weight[:, DEAD] = 0
            for lin in (blk.attn.proj, blk.mlp.fc2):  # write it
                lin.weight[DEAD] = 0
                lin.bias[DEAD] = 0
        t.head.weight[:, DEAD] = 0
    return t


def token_lut(spec: dict, max_merges: int = 2) -> LatencyTable:
    """A table written down by hand (no timing): every GEMM scales with the token count, attention's
    scores with its square; a merge costs a little per token."""
    g = Grid.for_spec(spec, ProfileConfig(embed_points=2, head_points=0, qk_points=2, v_points=2, mlp_points=3),
                      Floors(), 8, token_axis(spec, 0, max_merges))
    T, E, H, Q, V = np.meshgrid(g.tokens, g.embed, g.heads, g.qk, g.v, indexing="ij")
    attn = 0.01 + 1e-6 * T * E * H * (2 * Q + V) + 1e-6 * T * T * H * (Q + V)
    Tm, Em, M = np.meshgrid(g.tokens, g.embed, g.mlp, indexing="ij")
    mlp = 0.01 + 2e-6 * Tm * Em * M
    Tg, Eg = np.meshgrid(g.tokens, g.embed, indexing="ij")
    merge = np.where(Tg > min(g.tokens), 1e-5 * Tg * Eg, 0.0)
    shell = 0.05 + 1e-3 * np.asarray(g.embed, dtype=np.float64)
    return LatencyTable(Target(batch=64, threads=2).signature(Plan.full(spec).num_tokens), spec, g, attn, mlp, shell,
                        merge=merge)


def identical_tokens(t):
    """Every patch token is the same vector after the stem: no patch content, one position embedding."""
    with torch.no_grad():
        t.patch_embed.proj.weight.zero_()
        t.pos_embed.copy_(t.pos_embed[:, :1].expand_as(t.pos_embed))
    return t


def reachable_fraction(lut, frac: float, skip_blocks: bool, prune_embed: bool = True) -> float:
    """``frac`` raised, where needed, to 40% of the way from the floor plan to the teacher: a tiny model's floor
    can cost over half the teacher on a loaded machine (per-run overhead dominates), so the budget stays
    reachable whatever this session's LUT measured. ``prune_embed=False``: the strategy keeps the whole
    embedding (uniform), so its floor does too."""
    blocks = 1 if skip_blocks else lut.spec["depth"]
    embed = lut.grid.embed[0] if prune_embed else lut.spec["embed_dim"]
    lower = lut.predict(floor_plan(lut.spec, Floors(), embed, blocks, 8)) / lut.predict(Plan.full(lut.spec))
    return max(frac, round(lower + 0.4 * (1 - lower), 3))


def check_plan(res, lut, frac: float) -> None:
    """The search's plan meets the budget, the floors and the alignment, and its log ends at its cost."""
    plan = res.plan
    assert lut.predict(plan) <= res.budget + 1e-9
    assert res.budget == pytest.approx(frac * lut.predict(Plan.full(lut.spec)))
    assert plan.embed_dim % 8 == 0 and plan.embed_dim >= 8
    for b in plan.blocks:
        if b.keep:
            H, QK, V, M = b.dims
            assert H >= 1 and QK >= 8 and V >= 8 and M >= 16
            assert QK % 8 == 0 and V % 8 == 0 and M % 8 == 0
    assert len(res.log) >= 2 and res.log[-1]["cost"] == pytest.approx(lut.predict(plan))
