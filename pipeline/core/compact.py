"""CompactViT: a dense ViT with per-block head count, QK, V and MLP dims.

NViT (Yang et al., "Global Vision Transformer Pruning with Hessian-Aware
Saliency", CVPR 2023) shows that pruned ViTs want *different* widths per block
and separate QK and V head dims. timm's ``Block`` can't express that, so vitrim
owns this small module. What differs from ``timm.models.vision_transformer``:

* ``Attention.qkv`` is one fused ``Linear(E, H*QK + H*QK + H*V)`` with unequal
  splits; timm's is ``Linear(E, 3*E)`` with QK == V == head_dim.
* The attention scale stays the *teacher's* ``head_dim**-0.5`` even when QK dims
  are pruned (the weights were trained with it); timm derives it from the
  current head dim. With QK == teacher head_dim both are the same number.
* Skipped blocks are absent, and the embedding dim may be smaller than the
  teacher's (LayerNorms then normalise over the kept channels only).
* No dropout, drop-path, qk_norm, register tokens or attention pooling.
* Optional search gates (``None`` by default, so export sees none of them).

With a keep-everything plan the forward runs exactly timm's ops on exactly
timm's tensors, so the outputs are bit-identical (pinned by a test).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.pipeline.core.plan import Plan


class CompactAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk: int, v: int, qkv_bias: bool, scale_head_dim: int,
                 proj_bias: bool = True):
        super().__init__()
        self.heads, self.qk, self.v = heads, qk, v
        self.qkv = nn.Linear(dim, heads * (2 * qk + v), bias=qkv_bias)
        self.proj = nn.Linear(heads * v, dim, bias=proj_bias)
        # None lets SDPA use qk**-0.5, which is the teacher's scale when QK is unpruned.
        self.scale: Optional[float] = None if qk == scale_head_dim else scale_head_dim ** -0.5
        self.gate_head: Optional[torch.Tensor] = None
        self.gate_qk: Optional[torch.Tensor] = None
        self.gate_v: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        H, QK, V = self.heads, self.qk, self.v
        qkv = self.qkv(x)
        if QK == V:  # same views as timm: (B, N, 3, H, d) -> (3, B, H, N, d)
            q, k, v = qkv.reshape(B, N, 3, H, QK).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = qkv.split([H * QK, H * QK, H * V], dim=-1)
            q = q.reshape(B, N, H, QK).transpose(1, 2)
            k = k.reshape(B, N, H, QK).transpose(1, 2)
            v = v.reshape(B, N, H, V).transpose(1, 2)
        if self.gate_qk is not None:
            q = q * self.gate_qk
        if self.gate_v is not None:
            v = v * self.gate_v
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        if self.gate_head is not None:
            x = x * self.gate_head.view(1, H, 1, 1)
        x = x.transpose(1, 2).reshape(B, N, H * V)
        return self.proj(x)


class CompactMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.gate: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        if self.gate is not None:
            x = x * self.gate
        return self.fc2(x)


class CompactBlock(nn.Module):
    def __init__(self, dim: int, heads: int, qk: int, v: int, mlp: int, qkv_bias: bool, scale_head_dim: int,
                 eps: float, layer_scale: bool, proj_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CompactAttention(dim, heads, qk, v, qkv_bias, scale_head_dim, proj_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CompactMlp(dim, mlp, proj_bias)
        self.ls1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.gate: Optional[torch.Tensor] = None  # whole-block gate (UVC-style skipping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        if self.ls1 is not None:
            a = a * self.ls1
        if self.gate is not None:
            a = a * self.gate
        x = x + a
        m = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            m = m * self.ls2
        if self.gate is not None:
            m = m * self.gate
        return x + m


class CompactViT(nn.Module):
    """A dense, smaller ViT built from a :class:`~vitrim.pipeline.core.plan.Plan`.

    ``blocks[j]`` is teacher block ``block_ids[j]``. ``forward`` returns logits;
    for distilled models it averages both heads (timm's inference behaviour),
    or returns both when ``distilled_training`` is set in training mode.
    """

    def __init__(self, plan: Plan):
        super().__init__()
        s = plan.spec
        self.plan = plan  # the architecture as data: what this model was built from
        self.spec = dict(s)
        E = plan.embed_dim
        self.embed_dim = E
        self.num_prefix = int(s["class_token"]) + int(s["dist_token"])
        self.no_embed_class = bool(s["no_embed_class"])
        self.global_pool = s["global_pool"]
        eps = s["norm_eps"]
        ph, pw = s["patch_size"]
        self.patch_embed = nn.Conv2d(s["in_chans"], E, kernel_size=(ph, pw), stride=(ph, pw), bias=s["patch_bias"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E)) if s["class_token"] else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, E)) if s["dist_token"] else None
        pos_len = plan.num_tokens - (self.num_prefix if self.no_embed_class else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, E))
        self.norm_pre = nn.LayerNorm(E, eps=eps) if s["pre_norm"] else None
        self.block_ids = plan.kept_blocks
        self.blocks = nn.ModuleList(
            CompactBlock(E, *plan.blocks[i].dims, s["qkv_bias"], s["scale_head_dim"], eps, s["layer_scale"],
                         s.get("proj_bias", True))
            for i in self.block_ids)
        self.norm = nn.LayerNorm(E, eps=eps) if s["final_norm"] else None
        self.fc_norm = nn.LayerNorm(E, eps=eps) if s["fc_norm"] else None
        self.head = nn.Linear(E, s["num_classes"])
        self.head_dist = nn.Linear(E, s["num_classes"]) if s["dist_token"] else None
        self.distilled_training = False
        self.gate_embed: Optional[torch.Tensor] = None  # search gate on the residual stream

    def _gate_embed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gate_embed is None else x * self.gate_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if self.no_embed_class:
            x = x + self.pos_embed
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + self.pos_embed
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        x = self._gate_embed(x)
        for blk in self.blocks:
            x = self._gate_embed(blk(x))
        if self.norm is not None:
            x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor):
        if self.head_dist is not None:
            a, b = self.head(x[:, 0]), self.head_dist(x[:, 1])
            if self.distilled_training and self.training:
                return a, b
            return (a + b) / 2
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix:].mean(dim=1)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        return self.head(x)

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


def build_compact(plan: Plan) -> CompactViT:
    return CompactViT(plan.validate())
