"""Micro-models for the LUT: one CompactViT block, or one of its halves, or the shell.

Each is built from the *same* modules the sliced model uses (CompactBlock,
CompactViT's stem and head), so the exported graph of a micro-model is the
graph of that part of a real student.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactBlock, CompactViT, TokenMerge, block_options
from vitrim.pipeline.core.plan import BlockPlan, Plan


def _init(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + base)
    return m.eval()


class AttnPart(nn.Module):
    """``x + attn(norm1(x))`` of a CompactBlock."""

    def __init__(self, blk: CompactBlock):
        super().__init__()
        self.blk = blk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.blk.attn(self.blk.norm1(x))
        if self.blk.ls1 is not None:
            a = a * self.blk.ls1
        return x + a


class MlpPart(nn.Module):
    """``x + mlp(norm2(x))`` of a CompactBlock."""

    def __init__(self, blk: CompactBlock):
        super().__init__()
        self.blk = blk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.blk.mlp(self.blk.norm2(x))
        if self.blk.ls2 is not None:
            m = m * self.blk.ls2
        return x + m


class NullPart(nn.Module):
    """``x + b``: what any [B, N, E] micro-model costs besides its layers (run overhead, I/O copies).

    Subtracted from the attn/MLP entries so a block inside a full model is not
    charged the per-run overhead twice (measured: +30-70% error on small plans without it).
    """

    def __init__(self, E: int):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b


def make_block(spec: dict, E: int, H: int, QK: int, V: int, M: int) -> CompactBlock:
    return _init(CompactBlock(E, H, QK, V, M, **block_options(spec)))  # the teacher's MLP kind, qk_norm, biases


def make_part(kind: str, spec: dict, E: int, H: int = 1, QK: int = 8, V: int = 8, M: int = 16) -> nn.Module:
    """``attn`` | ``mlp`` | ``block`` | ``null`` (input [B, N, E]) or ``shell`` (image in, logits out)."""
    if kind == "shell":
        return make_shell(spec, E)
    if kind == "null":
        return NullPart(E).eval()
    blk = make_block(spec, E, H, QK, V, M)
    return {"attn": AttnPart, "mlp": MlpPart}[kind](blk) if kind != "block" else blk


def make_merge(spec: dict, grid: tuple[int, int], kind: str) -> TokenMerge:
    """A token merge of type ``kind`` receiving ``grid`` (input [B, prefix + h*w, E])."""
    return TokenMerge(grid, kind, Plan.full(spec).num_prefix).eval()  # class, distillation and register tokens


def make_plan_model(plan: Plan) -> CompactViT:
    """A whole sliced model of ``plan`` with random weights (latency does not depend on the values)."""
    return _init(CompactViT(plan))


def make_shell(spec: dict, E: int) -> CompactViT:
    """Stem (patch embed, tokens, pos_embed) and head (final norm, pool, classifier), no blocks."""
    plan = Plan(spec=spec, embed_keep=list(range(E)), blocks=[BlockPlan(False) for _ in range(spec["depth"])])
    return _init(CompactViT(plan))  # CompactViT does not require kept blocks; Plan.validate would


def sample_shape(kind: str, spec: dict, E: int, tokens: int) -> tuple[int, ...]:
    if kind in ("shell", "plan"):
        return (spec["in_chans"], *spec["img_size"])
    return (tokens, E)


@dataclass
class Item:
    """One thing a LUT build times: a micro-model, or a whole plan."""

    key: str
    kind: str  # attn | mlp | block | shell | null | plan | merge
    dims: tuple  # (E,) or (E, H, QK, V, M)
    plan: Optional[Plan] = None  # kind "plan": a whole model (calibration)
    tokens: Optional[int] = None  # token count of a [B, N, E] micro-model (None: the input's)
    merge: Optional[tuple] = None  # kind "merge": (grid, type)


def make_item(item: Item, spec: dict, tokens: int):
    """The micro-model (or whole plan) of ``item`` with random weights, and its per-sample input shape."""
    T = item.tokens or tokens
    if item.kind == "plan":
        return make_plan_model(item.plan), sample_shape("plan", spec, item.dims[0], T)
    if item.kind == "merge":
        return make_merge(spec, *item.merge), sample_shape("merge", spec, item.dims[0], T)
    return make_part(item.kind, spec, *item.dims), sample_shape(item.kind, spec, item.dims[0], T)
