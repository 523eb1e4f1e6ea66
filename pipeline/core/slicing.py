"""Physical slicing: teacher weights + Plan -> a dense, smaller CompactViT.

Masks don't make a model faster (UVC and ViT-Slim only masked); NViT removed
weights. The slicer owns every derived attribute (heads, head dims, scale,
embed dim: Torch-Pruning #101/#340 broke ViT metadata by not doing so): they are
all computed from the Plan by :class:`~vitrim.pipeline.core.compact.CompactViT`.

Embedding pruning selects channels along the whole residual stream: the
patch-embed conv output, cls/dist tokens, pos_embed, every LayerNorm, every
residual-side Linear (rows of proj/fc2, columns of qkv/fc1), LayerScale, the
final norm and the head input. A hybrid ViT's CNN stem, before the patch-embed
conv, is kept whole.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import make_dir
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.rundir import RunDir


def _qkv_rows(H: int, hd: int, heads: list[int], qk: list[int], v: list[int]) -> torch.Tensor:
    """Rows of the teacher's fused qkv ([q; k; v], head-major) that a block keeps."""
    A = H * hd
    q = [h * hd + d for h in heads for d in qk]
    k = [A + h * hd + d for h in heads for d in qk]
    vv = [2 * A + h * hd + d for h in heads for d in v]
    return torch.tensor(q + k + vv, dtype=torch.long)


Selection = dict[str, tuple[str, dict[int, torch.Tensor]]]  # compact name -> (canonical name, {dim: kept indices})


def slice_state(state: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """Slice a canonical (teacher-shaped) state dict to the plan's CompactViT state dict."""
    out: dict[str, torch.Tensor] = {}
    for dst, (src, dims) in selection(state, plan).items():
        t = state[src]
        for dim, idx in dims.items():
            t = t.index_select(dim, idx)
        out[dst] = t.clone()
    return out


def unslice_state(state: dict[str, torch.Tensor], compact: dict[str, torch.Tensor], plan: Plan
                  ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`slice_state` on the kept units: a copy of the canonical ``state`` with the compact
    model's weights (``compact``, sliced with ``plan``) written back where ``plan`` keeps them; pruned units keep
    ``state``'s values. ``slice_state(unslice_state(s, c, plan), plan)`` is ``c``."""
    out = {k: v.clone() for k, v in state.items()}
    for dst, (src, dims) in selection(state, plan).items():
        t = out[src]
        idx = [torch.arange(n) for n in t.shape]
        for dim, kept in dims.items():
            idx[dim] = kept
        t[torch.meshgrid(*idx, indexing="ij")] = compact[dst].to(t.dtype)
    return out


def selection(state: dict[str, torch.Tensor], plan: Plan) -> Selection:
    """Which canonical tensor, and which indices along which dims, each compact tensor of ``plan`` takes."""
    s = plan.spec
    H, hd = s["num_heads"], s["head_dim"]
    e = torch.tensor(plan.embed_keep, dtype=torch.long)
    out: Selection = {}

    def take(name: str, dst: str | None = None, **dims: torch.Tensor) -> None:
        if name not in state:
            return
        out[dst or name] = (name, {int(dim[1:]): idx for dim, idx in dims.items()})

    for name in state:  # a hybrid ViT's CNN stem is kept whole
        if name.startswith("stem."):
            take(name)
    take("patch_embed.weight", d0=e)
    take("patch_embed.bias", d0=e)
    for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        take(name, d2=e)
    for name in ("norm_pre", "norm", "fc_norm"):
        take(f"{name}.weight", d0=e)
        take(f"{name}.bias", d0=e)
    if s.get("attn_pool"):  # kept whole: only its kv reads the (kept) embedding channels
        for name in state:
            if name.startswith("attn_pool."):
                take(name, d1=e) if name == "attn_pool.kv.weight" else take(name)
        take("head.weight")
        take("head.bias")
    else:
        for name in ("head", "head_dist"):
            take(f"{name}.weight", d1=e)
            take(f"{name}.bias")
    M = s["mlp_hidden"]
    for j, i in enumerate(plan.kept_blocks):
        b = plan.blocks[i]
        src, dst = f"blocks.{i}.", f"blocks.{j}."
        rows = _qkv_rows(H, hd, b.heads, b.qk, b.v)
        vcols = torch.tensor([h * hd + d for h in b.heads for d in b.v], dtype=torch.long)
        m = torch.tensor(b.mlp, dtype=torch.long)
        fc1_rows = torch.cat([m, m + M]) if s.get("mlp_glu") else m  # a gated unit keeps its [a; b] pair
        qk = torch.tensor(b.qk, dtype=torch.long)
        for ln in ("norm1", "norm2"):
            take(src + ln + ".weight", dst + ln + ".weight", d0=e)
            take(src + ln + ".bias", dst + ln + ".bias", d0=e)
        take(src + "attn.qkv.weight", dst + "attn.qkv.weight", d0=rows, d1=e)
        take(src + "attn.qkv.bias", dst + "attn.qkv.bias", d0=rows)
        take(src + "attn.proj.weight", dst + "attn.proj.weight", d0=e, d1=vcols)
        take(src + "attn.proj.bias", dst + "attn.proj.bias", d0=e)
        for norm in ("q_norm", "k_norm"):  # per-head norms over the QK dims every head shares
            take(src + f"attn.{norm}.weight", dst + f"attn.{norm}.weight", d0=qk)
            take(src + f"attn.{norm}.bias", dst + f"attn.{norm}.bias", d0=qk)
        take(src + "mlp.fc1.weight", dst + "mlp.fc1.weight", d0=fc1_rows, d1=e)
        take(src + "mlp.fc1.bias", dst + "mlp.fc1.bias", d0=fc1_rows)
        take(src + "mlp.fc2.weight", dst + "mlp.fc2.weight", d0=e, d1=m)
        take(src + "mlp.fc2.bias", dst + "mlp.fc2.bias", d0=e)
        take(src + "ls1", dst + "ls1", d0=e)
        take(src + "ls2", dst + "ls2", d0=e)
    return out


def slice_model(teacher: nn.Module | dict, plan: Plan) -> CompactViT:
    """``slice(teacher, plan) -> CompactViT``: copy every kept parameter.

    ``teacher`` is a timm ViT, or a canonical (teacher-shaped) state dict such as
    the search's adapted weights.
    """
    from vitrim.pipeline.core.models import canonical_state

    plan.validate()
    state = teacher if isinstance(teacher, dict) else canonical_state(teacher)
    check_source(state, plan.spec)
    model = CompactViT(plan)
    sliced = slice_state(state, plan)
    own = model.state_dict()
    missing = sorted(set(own) - set(sliced))
    if missing:
        raise UserError("slice", f"teacher weights lack {missing[:3]} needed by the plan",
                        "slice with the teacher the plan was made from")
    for k, v in sliced.items():
        if own[k].shape != v.shape:
            raise UserError("slice", f"'{k}': sliced shape {tuple(v.shape)} != plan shape {tuple(own[k].shape)}",
                            "the plan's spec does not match this teacher; re-run search on it")
    model.load_state_dict(sliced)
    return model.eval()


def check_source(state: dict[str, torch.Tensor], spec: dict) -> None:
    """Refuse teacher weights whose shapes differ from the plan's spec."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in CompactViT(Plan.full(spec)).state_dict().items()}
    bad = [k for k in want if k not in state or state[k].shape != want[k]]
    extra = [k for k in state if k not in want]
    if bad or extra:
        k = (bad or extra)[0]
        got = tuple(state[k].shape) if k in state else "missing"
        raise UserError("slice", f"the plan's spec does not match these teacher weights ('{k}': teacher {got}, "
                        f"spec {tuple(want[k]) if k in want else 'absent'})",
                        "slice with the teacher the plan was searched on, or re-run search on this teacher")


def full_size_compact(teacher: nn.Module) -> tuple[CompactViT, Plan]:
    """A keep-everything CompactViT of a timm teacher, and its plan."""
    from vitrim.pipeline.core.models import describe

    plan = Plan.full(describe(teacher))
    return slice_model(teacher, plan), plan


def save_compact(model: CompactViT, plan: Plan, out_dir: str | os.PathLike) -> None:
    """Write ``student.safetensors`` and ``plan.json`` (each atomically)."""
    from vitrim.pipeline.core.models import save_weights

    out = Path(out_dir)
    make_dir(out, "slice")
    plan.save(RunDir(out).plan)
    save_weights(model, RunDir(out).student, metadata={"format": "vitrim.compact", "schema": "1"})


def load_compact(path: str | os.PathLike) -> CompactViT:
    """Rebuild a CompactViT from ``DIR/plan.json`` + ``DIR/student.safetensors``, no teacher needed."""
    from vitrim.pipeline.core.models import load_weights

    d = Path(path)
    plan = Plan.load(RunDir(d).plan)
    model = CompactViT(plan)
    load_weights(model, RunDir(d).student, stage="slice")
    return model.eval()
