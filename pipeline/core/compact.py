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
* A hybrid ViT's CNN stem (``stem``, timm's own backbone module rebuilt by
  :func:`~vitrim.pipeline.core.models.build_stem`) is kept whole; ``patch_embed``
  is then the projection from its feature map.
* No dropout or drop-path. Register tokens, qk_norm (LayerNorms over each head's
  kept QK dims), QuickGELU / GELU-tanh / gated (GLU) MLPs and SigLIP's attention
  pool (:class:`CompactAttnPool`, kept whole) are the same ops as timm's.
* Optional search gates (``None`` by default, so export sees none of them).

Search gates: the search prunes a gated full-size model and ships the sliced
model, so a gated model computes *exactly* what the model sliced with the same
plan computes (tested for every gate kind, alone and combined, to 1e-5):

* ``gate_head`` (per head, on the attention output), ``gate_qk`` (on q: a
  zero q_d removes q_d*k_d from every score, the teacher's scale stays),
  ``gate_v`` (on v), ``CompactMlp.gate`` (after GELU) and ``CompactBlock.gate``
  (on both residual branches) zero what slicing removes.
* ``gate_embed`` (residual channels, shared by the model and every block) turns
  every LayerNorm on the residual stream (``norm_pre``, ``norm1``, ``norm2``,
  ``norm``, ``fc_norm``) into a *masked* LayerNorm: mean and variance over the
  kept channels only, output zero at pruned channels. A plain LayerNorm would
  normalise over all E channels and write its bias into the pruned ones, which
  then feed qkv, fc1 and the head: not the sliced network. With 0/1 gates the
  masked LayerNorm equals ``LayerNorm(len(kept))`` with the sliced affine
  parameters. The residual stream itself is *not* gated: every reader of it is
  a masked LayerNorm (or, without a final norm, the gated head input), so what
  sits in a pruned channel never reaches the output. Gating it too would give
  the same function at 0/1 gates but compound the gate once per block
  (``g**depth``), inflating ``dL/dgate`` several-fold; this way the embedding
  score is on the scale of the other gates' (all are first-order estimates of
  the loss change of removing the unit; NViT saliency,
  :mod:`vitrim.pipeline.search.saliency`).

With a keep-everything plan and no gates the forward runs exactly timm's ops on
exactly timm's tensors, so the outputs are bit-identical (pinned by a test).

Token merges (``plan.tokens``, :class:`TokenMerge`) sit at block boundaries and
shrink the patch grid for every later block; they have no parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.pipeline.core.models import build_stem
from vitrim.pipeline.core.plan import MERGE_TYPES, Plan, merged_grid


def gated_layer_norm(ln: nn.LayerNorm, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """``ln(x)``, or with a channel gate: LayerNorm over the kept (gate 1) channels, zero at pruned ones.

    Statistics are gate-weighted means, so at 0/1 gates this is exactly the sliced
    LayerNorm, and values at pruned channels of ``x`` never reach the output.
    """
    if gate is None:
        return ln(x)
    n = gate.sum().clamp_min(1e-12)  # an all-zero gate (a skipped block's QK dims) gives zeros, not 0/0
    mean = (x * gate).sum(-1, keepdim=True) / n
    xc = x - mean
    var = (xc * xc * gate).sum(-1, keepdim=True) / n
    return (xc * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * gate


class TokenMerge(nn.Module):
    """Merge neighbouring patch tokens with static shapes (CAIT-style; no parameters).

    The patch grid (h, w) is cut into windows of (1, 2), (2, 1) or (2, 2)
    neighbours (type ``w``, ``h``, ``hw``) and each window becomes one token; the
    result is again a row-major grid, (h, ceil(w/2)) etc., so dense heads can
    reshape it. Odd sides are padded: the last row/column merges alone (its pad
    slots get weight 0). Class/distillation tokens pass through untouched.

    Weights: within a window, ``softmax(rms(token))`` where ``rms`` is the token's
    root-mean-square over (kept) channels, so a window's larger-norm tokens
    dominate: an asymmetric, data-dependent weighting in the spirit of CAIT's
    ATME (which weights neighbours by importance) rather than ToMe's bipartite
    matching. Shapes never depend on the data, so the ONNX graph is
    Slice/Pad/Reshape/Transpose, elementwise ops (Abs/Clip/Div/Mul/Sqrt/Add),
    ReduceMax/ReduceMean/ReduceSum, Softmax and Concat, with no Scatter, TopK or
    data-dependent shapes (pinned by a test), and TensorRT gets the same graph.

    ``gate`` (the search's embedding gate, set by :class:`CompactViT`): the rms is
    taken over the kept channels only, so a gated full-size model merges exactly
    like the sliced one.

    Numerics: the rms is computed as ``m * sqrt(mean((t / m)**2))`` with
    ``m = max|t|`` over the (kept) channels, the same number as
    ``sqrt(mean(t**2))`` in fp32 (to rounding) but with no intermediate above
    ``max|t|``. The plain mean of squares overflows fp16 (max 65504) at any
    ``|t| > 255``: one residual channel at 300 gave inf, then NaN, in TensorRT
    fp16 engines and torch fp16 targets (``model.half()``; under fp16 autocast
    the residual stream stays fp32). The form needs no upcast, which an fp32
    export would not even record (``x.float()`` on an fp32 tensor exports no
    Cast), so the fp16 ONNX that TensorRT builds from is safe for any finite
    activation.
    """

    def __init__(self, grid: tuple[int, int], kind: str, num_prefix: int):
        super().__init__()
        self.grid, self.kind, self.num_prefix = (int(grid[0]), int(grid[1])), kind, num_prefix
        self.window = MERGE_TYPES[kind]
        self.out_grid = merged_grid(self.grid, kind)
        h, w = self.grid
        sh, sw = self.window
        self.pad = (self.out_grid[0] * sh - h, self.out_grid[1] * sw - w)  # rows, cols appended
        valid = F.pad(torch.zeros(h, w), (0, self.pad[1], 0, self.pad[0]), value=-1e4)  # pad slots: weight ~0
        oh, ow = self.out_grid
        valid = valid.reshape(oh, sh, ow, sw).permute(0, 2, 1, 3).reshape(oh * ow, sh * sw)
        self.register_buffer("pad_bias", valid, persistent=False)
        self.gate: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"{self.kind}: {self.grid[0]}x{self.grid[1]} -> {self.out_grid[0]}x{self.out_grid[1]}"

    def _rms(self, t: torch.Tensor) -> torch.Tensor:
        """Root-mean-square of ``t`` over its (kept) channels, with no intermediate above ``max|t|``.

        ``(t / m)**2 <= 1``, so nothing overflows in fp16. The channel at ``max|t|``
        gives ``t / m == ±1`` exactly, so the mean of squares is at least ``1/E``
        (for gates in [0, 1]) and flooring it there changes no token; the floor
        only keeps ``sqrt`` differentiable at all-zero tokens (the pad slots).
        ``m``'s floor 2**-14 (the smallest normal fp16, exact in every float
        dtype, and no subnormal that a flush-to-zero kernel would zero) keeps an
        all-zero token from dividing 0 by 0; a token whose ``max|t|`` is below it
        gets an rms off by less than 2**-14, a negligible shift of a softmax logit.
        """
        a = t.abs() if self.gate is None else t.abs() * self.gate
        m = a.amax(-1, keepdim=True).clamp_min(2.0 ** -14)
        r = t / m
        sq = r * r if self.gate is None else r * r * self.gate
        ms = sq.mean(-1) if self.gate is None else sq.sum(-1) / self.gate.sum()
        return m.squeeze(-1) * torch.sqrt(ms.clamp_min(1.0 / t.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, E = x.shape
        P, (h, w), (sh, sw), (oh, ow) = self.num_prefix, self.grid, self.window, self.out_grid
        t = x[:, P:].reshape(B, h, w, E)
        if self.pad[0] or self.pad[1]:
            t = F.pad(t, (0, 0, 0, self.pad[1], 0, self.pad[0]))
        t = t.reshape(B, oh, sh, ow, sw, E).permute(0, 1, 3, 2, 4, 5).reshape(B, oh * ow, sh * sw, E)
        wgt = torch.softmax(self._rms(t) + self.pad_bias, dim=-1)
        t = (t * wgt.unsqueeze(-1)).sum(2)
        return torch.cat([x[:, :P], t], dim=1) if P else t


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (OpenAI CLIP's activation; the same ops as timm's ``QuickGELU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """The MLP activation a spec names (``mlp_act``): exact GELU, tanh GELU, QuickGELU, SiLU or sigmoid."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")  # timm's GELUTanh calls F.gelu(approximate='tanh'): the same op
    if name == "quick_gelu":
        return QuickGELU()
    if name == "silu":
        return nn.SiLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown MLP activation {name!r}")


def block_options(spec: dict) -> dict:
    """The keyword arguments of :class:`CompactBlock` that a teacher's spec fixes (every block shares them)."""
    return {"qkv_bias": spec["qkv_bias"], "scale_head_dim": spec["scale_head_dim"], "eps": spec["norm_eps"],
            "layer_scale": spec["layer_scale"], "proj_bias": spec.get("proj_bias", True),
            "qk_norm": spec.get("qk_norm", False), "act": spec.get("mlp_act", "gelu"),
            "glu": spec.get("mlp_glu")}


class CompactAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk: int, v: int, qkv_bias: bool, scale_head_dim: int,
                 proj_bias: bool = True, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads, self.qk, self.v = heads, qk, v
        self.qkv = nn.Linear(dim, heads * (2 * qk + v), bias=qkv_bias)
        # qk_norm: LayerNorm over each head's kept QK dims (shared by all heads, as in timm)
        self.q_norm = nn.LayerNorm(qk, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(qk, eps=eps) if qk_norm else None
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
        if self.q_norm is not None:  # a gated QK dim leaves the norms' statistics, as slicing it would
            q = gated_layer_norm(self.q_norm, q, self.gate_qk)
            k = gated_layer_norm(self.k_norm, k, self.gate_qk)
        elif self.gate_qk is not None:
            q = q * self.gate_qk
        if self.gate_v is not None:
            v = v * self.gate_v
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        if self.gate_head is not None:
            x = x * self.gate_head.view(1, H, 1, 1)
        x = x.transpose(1, 2).reshape(B, N, H * V)
        return self.proj(x)


class CompactMlp(nn.Module):
    """``fc2(act(fc1(x)))``, or gated (timm's ``GluMlp``): ``fc1`` gives [a; b] (M units each) and the hidden
    units are ``a * act(b)`` (``glu='last'``) or ``act(a) * b`` (``glu='first'``); a pruned unit drops its pair."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, act: str = "gelu", glu: Optional[str] = None):
        super().__init__()
        self.glu = glu
        self.fc1 = nn.Linear(dim, hidden * (2 if glu else 1), bias=bias)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.gate: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu is None:
            x = self.act(self.fc1(x))
        else:
            a, b = self.fc1(x).chunk(2, dim=-1)
            x = a * self.act(b) if self.glu == "last" else self.act(a) * b
        if self.gate is not None:
            x = x * self.gate
        return self.fc2(x)


class CompactBlock(nn.Module):
    def __init__(self, dim: int, heads: int, qk: int, v: int, mlp: int, qkv_bias: bool, scale_head_dim: int,
                 eps: float, layer_scale: bool, proj_bias: bool = True, qk_norm: bool = False, act: str = "gelu",
                 glu: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CompactAttention(dim, heads, qk, v, qkv_bias, scale_head_dim, proj_bias, qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CompactMlp(dim, mlp, proj_bias, act, glu)
        self.ls1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.gate: Optional[torch.Tensor] = None  # whole-block gate (UVC-style skipping)
        self.gate_embed: Optional[torch.Tensor] = None  # the model's residual-channel gate (set by CompactViT)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, ls: Optional[nn.Parameter]) -> torch.Tensor:
        if ls is not None:
            branch = branch * ls
        if self.gate is not None:
            branch = branch * self.gate
        return x + branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.attn(gated_layer_norm(self.norm1, x, self.gate_embed)), self.ls1)
        return self._residual(x, self.mlp(gated_layer_norm(self.norm2, x, self.gate_embed)), self.ls2)


class CompactAttnPool(nn.Module):
    """timm's ``AttentionPoolLatent`` (SigLIP's 'map' head), kept whole: only ``kv``'s input channels follow the
    embedding. Its own width ``dim`` stays the teacher's, so the head after it is not sliced either.

    The same ops as timm's (fused SDPA, then ``x + mlp(norm(x))``, then the first latent or their mean);
    the output is reshaped with the pool's width rather than the input's, which differ once the
    embedding is pruned.
    """

    def __init__(self, in_dim: int, cfg: dict, eps: float, act: str):
        super().__init__()
        dim, self.heads, self.latent_len = cfg["dim"], cfg["num_heads"], cfg["latent_len"]
        self.dim, self.head_dim, self.pool = dim, dim // self.heads, cfg["pool"]
        self.latent = nn.Parameter(torch.zeros(1, self.latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=cfg["qkv_bias"])
        self.kv = nn.Linear(in_dim, 2 * dim, bias=cfg["qkv_bias"])
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps) if cfg["norm"] else None
        self.mlp = CompactMlp(dim, cfg["mlp_hidden"], True, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, self.latent_len, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.transpose(1, 2).reshape(B, self.latent_len, self.dim))
        x = x + self.mlp(self.norm(x) if self.norm is not None else x)
        return x[:, 0] if self.pool == "token" else x.mean(1)


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
        self.num_prefix = plan.num_prefix
        self.pool_include_prefix = bool(s.get("pool_include_prefix", False))
        self.no_embed_class = bool(s["no_embed_class"])
        self.global_pool = s["global_pool"]
        eps = s["norm_eps"]
        ph, pw = s["patch_size"]
        stem = s.get("stem")
        self.stem = build_stem(stem) if stem else None  # a hybrid ViT's CNN backbone, timm's own module, kept whole
        C = stem["out_chans"] if stem else s["in_chans"]
        self.patch_embed = nn.Conv2d(C, E, kernel_size=(ph, pw), stride=(ph, pw), bias=s["patch_bias"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E)) if s["class_token"] else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, E)) if s["dist_token"] else None
        R = int(s.get("reg_tokens", 0))
        self.reg_token = nn.Parameter(torch.zeros(1, R, E)) if R else None
        pos_len = plan.num_tokens - (self.num_prefix if self.no_embed_class else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, E))
        self.norm_pre = nn.LayerNorm(E, eps=eps) if s["pre_norm"] else None
        self.block_ids = plan.kept_blocks
        self.blocks = nn.ModuleList(
            CompactBlock(E, *plan.blocks[i].dims, **block_options(s)) for i in self.block_ids)
        self.norm = nn.LayerNorm(E, eps=eps) if s["final_norm"] else None
        self.fc_norm = nn.LayerNorm(E, eps=eps) if s["fc_norm"] else None
        pool = s.get("attn_pool")
        self.attn_pool = CompactAttnPool(E, pool, eps, s.get("mlp_act", "gelu")) if pool else None
        nc = s["num_classes"]  # 0: a feature extractor (timm's Identity head)
        self.head = nn.Linear(pool["dim"] if pool else E, nc) if nc else nn.Identity()
        self.head_dist = (nn.Linear(E, nc) if nc else nn.Identity()) if s["dist_token"] else None
        self.distilled_training = False
        self._gate_embed: Optional[torch.Tensor] = None
        self.set_token_merges(plan.merges)

    def set_token_merges(self, merges: dict[int, str]) -> None:
        """Install token merges {teacher block index: type} (the search tries them on a full-size model)."""
        p = dataclasses.replace(self.plan, tokens=None).set_merges(dict(merges))  # shares the (unchanged) blocks
        p.check_tokens("token merges")
        inputs = p.merge_inputs()
        self.merges = nn.ModuleDict({str(i): TokenMerge(inputs[i], k, self.num_prefix) for i, k in sorted(merges.items())})
        dev = self.pos_embed.device
        self.merges.to(dev)
        for m in self.merges.values():
            m.gate = self._gate_embed
        # (merge or None, block or None) per teacher block, in order: what forward_features walks
        kept = {i: j for j, i in enumerate(self.block_ids)}
        self._schedule = [(str(i) if str(i) in self.merges else None, kept.get(i)) for i in range(len(self.plan.blocks))]

    @property
    def gate_embed(self) -> Optional[torch.Tensor]:
        """Search gate on the residual channels (``None``: ungated); shared with every block."""
        return self._gate_embed

    @gate_embed.setter
    def gate_embed(self, gate: Optional[torch.Tensor]) -> None:
        self._gate_embed = gate
        for blk in self.blocks:
            blk.gate_embed = gate
        for m in self.merges.values():
            m.gate = gate

    def _norm(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return gated_layer_norm(ln, x, self._gate_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
            if isinstance(x, (list, tuple)):  # timm's feature extractors return a list of maps
                x = x[-1]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        # timm's order: class, then distillation (DeiT) or register tokens
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if self.no_embed_class:
            x = x + self.pos_embed
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + self.pos_embed
        if self.norm_pre is not None:
            x = self._norm(self.norm_pre, x)
        if not self.merges:
            for blk in self.blocks:
                x = blk(x)
        else:
            for merge, j in self._schedule:
                if merge is not None:
                    x = self.merges[merge](x)
                if j is not None:
                    x = self.blocks[j](x)
        if self.norm is not None:
            x = self._norm(self.norm, x)
        return x

    def forward_head(self, x: torch.Tensor):
        if self.head_dist is not None:
            if self.norm is None and self._gate_embed is not None:  # no LayerNorm masks the heads' input
                x = x * self._gate_embed
            a, b = self.head(x[:, 0]), self.head_dist(x[:, 1])
            if self.distilled_training and self.training:
                return a, b
            return (a + b) / 2
        if self.attn_pool is not None:
            if self.norm is None and self._gate_embed is not None:  # no LayerNorm masks the pool's input
                x = x * self._gate_embed
            return self.head(self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix:]))
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            x = (x if self.pool_include_prefix else x[:, self.num_prefix:]).mean(dim=1)
        if self.fc_norm is not None:
            x = self._norm(self.fc_norm, x)
        elif self.norm is None and self._gate_embed is not None:  # no LayerNorm masks the head's input
            x = x * self._gate_embed
        return self.head(x)

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


def build_compact(plan: Plan) -> CompactViT:
    return CompactViT(plan.validate())
