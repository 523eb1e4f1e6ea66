"""Group saliency for structural pruning (NViT, Hessian-aware).

NViT (Yang et al., CVPR 2023) scores a group S of weights by
``(sum_{s in S} dL/dw_s * w_s)^2``, accumulated over batches: a Fisher
(Hessian-aware) estimate of the loss change when the whole group is removed.
For a group whose weights all feed one activation ``a`` (a head's output, a QK
or V channel shared by the block's heads, an MLP neuron, a residual channel, a
block's residual branches), ``sum_s dL/dw_s * w_s = dL/dg * a`` summed over the
batch, where ``g`` is a gate multiplying ``a`` at ``g = 1``. So we attach gates
(ones) to every prunable unit, backpropagate, and square each gate gradient per
batch. All scores are then estimates of the same quantity, a change in loss, so
heads, QK/V dims, MLP neurons, embedding channels and blocks are comparable
without per-type rescaling; groups of several units add their unit scores.

``magnitude_scores`` gives the L1 baseline (mean |w| of each unit's weights);
:func:`relative_magnitude` puts each group's on one scale (the search, the
closed loop's corrections and the benchmarks all use it).

Token merges (:func:`merge_scores`) have no gate: a merge changes the token
count, not a weight. There are few of them (boundaries x 3 types), so their
saliency is the KD-loss increase ``dL`` of applying the merge, measured
directly on the saliency batches. A gate's saliency is *quadratic* in the loss
change it estimates (to first order ``dL = -dL/dg``, and the score is its
square, summed over batches), so a merge is priced as ``scale * dL**2``: the
same direct loss increase is measured for the width groups the selection is
choosing among (the cheapest group of every block and dim, whole blocks, the
embedding group), and ``scale`` is the median of ``gate saliency / dL**2``
over those groups. A merge and a width group with the same loss change then get
the same score, and twice the loss change costs four times the score for
either. (A linear map, ``gate saliency / dL`` times the merge's ``dL``, priced
a merge right only at the calibration groups' typical ``dL``: too cheap above
it, too dear below.) The scale (the batch-gradient Fisher is smaller than the
per-sample one by about the batch size) is measured on the model at hand
rather than assumed.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.search.groups import EMBED, Candidate, GroupKey


def attach_gates(model: CompactViT, masks: dict | None = None) -> dict[GroupKey, torch.Tensor]:
    """Put gate tensors (ones) on every prunable group of ``model``; returns {group: tensor}.

    Groups: the embedding, each block's heads, QK, V and MLP, each whole block (block j = model.blocks[j]).
    ``masks`` (same keys, 0/1 tensors: :func:`~vitrim.pipeline.search.groups.masks_from_plan`) sets pruned
    units to 0.
    """
    dev = next(model.parameters()).device  # gates live where the model runs (CUDA in a GPU search)
    gates = {EMBED: torch.ones(model.embed_dim, device=dev)}
    for j, blk in enumerate(model.blocks):
        a = blk.attn
        for dim, n in (("heads", a.heads), ("qk", a.qk), ("v", a.v), ("mlp", blk.mlp.fc2.in_features), ("block", 1)):
            gates[GroupKey(dim, j)] = torch.ones(n, device=dev)
    for key, g in gates.items():
        set_gate(model, key, g)
    if masks:
        for k, m in masks.items():
            gates[k].copy_(m)
    return gates


def set_gate(model: CompactViT, key: GroupKey, value: torch.Tensor | None) -> None:
    """Install ``value`` as the gate of group ``key`` on ``model`` (None removes it)."""
    if key.dim == "embed":
        model.gate_embed = value
        return
    blk = model.blocks[key.block]
    if key.dim == "block":
        blk.gate = value
    elif key.dim == "mlp":
        blk.mlp.gate = value
    else:
        setattr(blk.attn, {"heads": "gate_head", "qk": "gate_qk", "v": "gate_v"}[key.dim], value)


def detach_gates(model: CompactViT) -> None:
    model.gate_embed = None
    for blk in model.blocks:
        blk.attn.gate_head = blk.attn.gate_qk = blk.attn.gate_v = None
        blk.mlp.gate = None
        blk.gate = None


def hessian_scores(model: CompactViT, gates: dict, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Accumulate ``(dL/dg)^2`` per unit over batches (NViT saliency)."""
    scores = {k: torch.zeros_like(g) for k, g in gates.items()}
    for g in gates.values():
        g.requires_grad_(True)
    model.eval()  # saliency without dropout-style noise; CompactViT has none anyway
    try:
        for x, y in batches:
            for g in gates.values():
                g.grad = None
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
            for (k, _), gr in zip(gates.items(), grads):
                if gr is not None:
                    scores[k] += gr.detach() ** 2
    finally:
        for g in gates.values():
            g.requires_grad_(False)
    return {k: v.cpu() for k, v in scores.items()}  # selection reads scores unit by unit: no GPU sync per unit


@torch.no_grad()
def mean_loss(model: nn.Module, loss_fn, batches) -> float:
    """The mean of ``loss_fn`` over ``batches`` (no gradients)."""
    return float(sum(float(loss_fn(model, x, y)) for x, y in batches) / max(1, len(batches)))


def adapted_losses(model: CompactViT, merges: dict[int, str], loss_fn, batches: list,
                   adapt: Callable[[nn.Module], None]) -> torch.Tensor:
    """The loss on each of ``batches`` of a copy of ``model`` with token ``merges`` installed, after ``adapt(copy)``
    (a few KD steps): the loss a merge leaves once the weights had a chance to repair it. ``model`` is untouched."""
    import copy

    m = copy.deepcopy(model)
    m.set_token_merges(merges)
    with torch.enable_grad():
        adapt(m)
    m.eval()
    return torch.tensor([float(loss_fn(m, x, y)) for x, y in batches], dtype=torch.float64)


@torch.no_grad()
def merge_scores(model: CompactViT, gates: dict, loss_fn, batches: list, merges: dict[int, str],
                 options: list[GroupKey], groups: list[Candidate],
                 adapt: Callable[[nn.Module], None] | None = None) -> tuple[dict[GroupKey, float], dict]:
    """Saliency of each token merge in ``options`` (merge keys), on the gate saliencies' scale.

    ``merges``: the merges already in the plan (installed on ``model``); ``groups``:
    search candidates (width groups, blocks, embedding) whose direct loss change
    ``d`` calibrates ``scale = median(saliency / d**2)``; a merge with loss change
    ``d`` scores ``scale * d**2``. Returns ({merge key: saliency}, a log record).

    ``adapt`` (``search.merge_scoring: adapted``): a merge's ``d`` is the loss of the
    merged network after ``adapt`` (a few KD steps on a copy, the same batches for
    every option) minus the loss of the unmerged network adapted alike; the width
    groups' calibration stays as it is (their saliency is the unadapted estimate).
    An adapted ``d`` is a small difference of two noisy losses, often slightly
    negative: it is floored at its standard error over the batches, so no merge
    is priced as free because of the noise (a free merge would be taken first).
    """
    model.eval()
    base = mean_loss(model, loss_fn, batches)
    raw = {}
    if adapt is None:
        for key in options:
            model.set_token_merges({**merges, key.block: key.type})
            raw[key] = mean_loss(model, loss_fn, batches) - base
        model.set_token_merges(merges)
        adapted_base = None
    else:
        ref = adapted_losses(model, merges, loss_fn, batches, adapt)
        adapted_base, floors = float(ref.mean()), {}
        for key in options:
            diff = adapted_losses(model, {**merges, key.block: key.type}, loss_fn, batches, adapt) - ref
            se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
            raw[key], floors[key] = float(diff.mean()), se
    ratios = []
    for c in groups:
        g = gates[c.key]
        old = g.clone()
        if c.dim == "block":
            g.zero_()
        else:
            g[c.units] = 0
        d = mean_loss(model, loss_fn, batches) - base
        g.copy_(old)
        if d > 1e-6 and c.saliency > 0:
            ratios.append(c.saliency / d ** 2)  # the gate saliency is quadratic in the loss change
    scale = float(torch.tensor(ratios, dtype=torch.float64).median()) if ratios else 1.0
    tol = 1e-6 * max(1.0, abs(base))  # float32 rounding of a mean loss: a change below it is no change
    priced = raw if adapt is None else {k: max(v, floors[k]) for k, v in raw.items()}
    out = {k: scale * (v * v if v > tol else 0.0) for k, v in priced.items()}
    info = {"base_loss": base, "scale": scale, "calibration_groups": len(ratios),
            "scoring": "unadapted" if adapt is None else "adapted",
            "loss_increase": {f"{k.block}:{k.type}": v for k, v in raw.items()}}
    if adapted_base is not None:
        info["adapted_base_loss"] = adapted_base
        info["noise_floor"] = {f"{k.block}:{k.type}": v for k, v in floors.items()}
    return out, info


def magnitude_scores(model: CompactViT) -> dict[GroupKey, torch.Tensor]:
    """L1 baseline: mean |w| of the weights that belong to each unit."""
    out = {}
    E = model.embed_dim
    emb = torch.zeros(E, device=next(model.parameters()).device)
    n_emb = 0
    for j, blk in enumerate(model.blocks):
        a = blk.attn
        H, QK, V = a.heads, a.qk, a.v
        W = a.qkv.weight.detach().abs()
        q, k, v = W[:H * QK].view(H, QK, E), W[H * QK:2 * H * QK].view(H, QK, E), W[2 * H * QK:].view(H, V, E)
        P = a.proj.weight.detach().abs().view(E, H, V)
        out[GroupKey("heads", j)] = (q.mean((1, 2)) + k.mean((1, 2)) + v.mean((1, 2)) + P.mean((0, 2))) / 4
        out[GroupKey("qk", j)] = (q.mean((0, 2)) + k.mean((0, 2))) / 2
        out[GroupKey("v", j)] = (v.mean((0, 2)) + P.mean((0, 1))) / 2
        f1, f2 = blk.mlp.fc1.weight.detach().abs(), blk.mlp.fc2.weight.detach().abs()
        if blk.mlp.glu:  # a gated unit is its [a; b] pair of fc1 rows
            f1 = torch.cat(f1.chunk(2, dim=0), dim=1)
        out[GroupKey("mlp", j)] = (f1.mean(1) + f2.mean(0)) / 2
        out[GroupKey("block", j)] = torch.stack([a.proj.weight.detach().abs().mean(), f2.mean()]).mean().view(1)
        f1e = blk.mlp.fc1.weight.detach().abs()
        emb += W.mean(0) + a.proj.weight.detach().abs().mean(1) + f1e.mean(0) + f2.mean(1)
        n_emb += 4
    out[EMBED] = emb / max(1, n_emb)
    return {k: v.cpu() for k, v in out.items()}  # selection reads scores unit by unit: keep them off the GPU


def relative_magnitude(model: CompactViT) -> dict[GroupKey, torch.Tensor]:
    """:func:`magnitude_scores`, each group's divided by its mean: the ``magnitude`` strategy's scores.

    Per-group relative magnitude, so groups whose weights differ in scale (an MLP
    neuron's against a head's) compete on one scale.
    """
    return {k: v / (v.mean() + 1e-12) for k, v in magnitude_scores(model).items()}
