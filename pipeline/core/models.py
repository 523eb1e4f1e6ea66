"""The timm adapter: the only module that knows timm's ViT module names.

It creates a timm ViT by name, loads local checkpoints, and describes a teacher
as plain data (:func:`describe`) plus a canonical state dict in CompactViT naming
(:func:`canonical_state`). Everything downstream (slicing, search, export) works
on those two, never on timm modules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.pipeline.core.config import ModelConfig
from vitrim.pipeline.core.errors import UserError


def create_model(cfg: ModelConfig, load_checkpoint: bool = True, pretrained: bool | None = None,
                 **overrides: Any) -> nn.Module:
    """Create a timm ViT by name with constructor overrides, then load weights.

    ``cfg.kwargs`` (and ``overrides``) are passed to ``timm.create_model``; they
    override the architecture's defaults (num_classes, img_size, in_chans,
    patch_size, embed_dim, depth, num_heads, ...).
    """
    import timm

    kwargs = {**cfg.kwargs, **overrides}
    if cfg.arch not in timm.list_models():
        raise UserError("model", f"'{cfg.arch}' is not a timm model name",
                        "use a ViT name from timm.list_models('*vit*') or timm.list_models('deit*')")
    try:
        model = timm.create_model(cfg.arch, pretrained=cfg.pretrained if pretrained is None else pretrained, **kwargs)
    except TypeError as e:
        raise UserError("model", f"timm rejected model.kwargs {kwargs} for '{cfg.arch}': {e}",
                        "remove or rename the offending key in model.kwargs") from None
    except (OSError, RuntimeError, ConnectionError) as e:
        if cfg.pretrained:
            raise UserError("model", f"could not fetch pretrained weights for '{cfg.arch}' ({type(e).__name__}: {e})",
                            "this machine is offline: set model.pretrained=false and model.checkpoint to a local "
                            ".safetensors/.pth file") from None
        raise
    if cfg.checkpoint and load_checkpoint:
        load_weights(model, cfg.checkpoint)
    return model


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The architecture of ``cfg`` on the meta device (no weights, no memory): its shapes and timm defaults."""
    if cfg is None:
        raise UserError("data", "data.name=imagefolder needs the teacher to resolve its transforms",
                        "call build_splits(cfg.data, model_cfg=cfg.model) (the CLI does)")
    import timm

    if cfg.arch not in timm.list_models():
        raise UserError("model", f"'{cfg.arch}' is not a timm model name",
                        "use a ViT name from timm.list_models('*vit*') or timm.list_models('deit*')")
    try:
        with torch.device("meta"):
            return timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs)
    except TypeError as e:
        raise UserError("model", f"timm rejected model.kwargs {cfg.kwargs} for '{cfg.arch}': {e}",
                        "remove or rename the offending key in model.kwargs") from None


def read_pretrained_cfg(path: str | os.PathLike) -> dict:
    """A timm ``pretrained_cfg`` stored inside a checkpoint, or ``{}``.

    ``.pth``: a ``pretrained_cfg`` dict beside the state dict (``{"state_dict": ..., "pretrained_cfg": ...}``);
    ``.safetensors``: JSON under the metadata key ``pretrained_cfg``. Only the header / the pickle's
    small objects are read (tensors are memory-mapped where the format allows).
    """
    import json

    p = Path(path)
    if not p.is_file():
        return {}
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                raw = (f.metadata() or {}).get("pretrained_cfg")
            try:
                cfg = json.loads(raw) if raw else {}
            except json.JSONDecodeError as e:
                raise UserError("model", f"checkpoint '{p}': its 'pretrained_cfg' metadata is not JSON ({e})",
                                "re-save it with metadata={'pretrained_cfg': json.dumps(cfg)}") from None
        else:
            try:
                obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
            cfg = obj.get("pretrained_cfg", {}) if isinstance(obj, dict) else {}
    except UserError:
        raise
    except Exception:  # an unreadable file is reported by read_state_dict, which names the fix
        return {}
    return cfg if isinstance(cfg, dict) else {}


def read_state_dict(path: str | os.PathLike, stage: str = "model") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth`` (``weights_only=True``) state dict."""
    p = Path(path)
    if not p.is_file():
        raise UserError(stage, f"checkpoint '{p}' not found", "check the path, or train/produce it first")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            sd = obj
            for key in ("model", "state_dict", "model_ema"):
                if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                    sd = sd[key]
                    break
    except Exception as e:  # safetensors / pickle raise many types for a corrupt file
        raise UserError(stage, f"checkpoint '{p}' could not be read ({type(e).__name__}: {e})",
                        "the file is corrupt or not a state dict; re-create it") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(stage, f"checkpoint '{p}' does not hold a flat state dict of tensors",
                        "save it with model.state_dict() (safetensors or torch.save)")
    return sd


HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def load_weights(model: nn.Module, path: str | os.PathLike, stage: str = "model",
                 allow_new_head: bool = False) -> list[str]:
    """Load a checkpoint strictly; returns the keys left at their fresh init.

    With ``allow_new_head`` a classifier head of another class count is skipped
    (kept freshly initialised), for adapting a checkpoint to new classes.
    """
    sd = read_state_dict(path, stage)
    own = model.state_dict()
    fresh = []
    if allow_new_head:
        fresh = [k for k in HEAD_KEYS if k in own and k in sd and own[k].shape != sd[k].shape]
        sd = {k: v for k, v in sd.items() if k not in fresh}
        sd.update({k: own[k] for k in fresh})
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if shape_bad:
            k = shape_bad[0]
            parts.append(f"shape of '{k}' is {tuple(sd[k].shape)}, model wants {tuple(own[k].shape)}")
        raise UserError(stage, f"checkpoint '{path}' does not match the model: " + "; ".join(parts),
                        "use the checkpoint made for this architecture and model.kwargs")
    model.load_state_dict(sd)
    return fresh


def save_weights(model_or_sd: nn.Module | dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save a state dict as ``.safetensors``, atomically."""
    from safetensors.torch import save_file

    from vitrim.pipeline.core.io import atomic_save

    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_save(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


# ---------------------------------------------------------------------------
# Describing a timm ViT as data


def _refuse(arch: str, what: str) -> None:
    raise UserError("model", f"'{arch}': {what} is not supported by vitrim's slicer",
                    "use a plain ViT/DeiT variant (cls or avg pooling, optional dist token, LayerScale, qkv_bias on/off)")


def describe(model: nn.Module, arch: str = "", kwargs: dict | None = None) -> dict:
    """Describe a timm VisionTransformer as plain data (the Plan's ``spec``).

    Supported: DeiT / ViT with a class token, distilled DeiT (dist token, two
    heads), qkv_bias on/off, LayerScale (DeiT-III), ``no_embed_class``,
    ``global_pool`` 'token' or 'avg' (with fc_norm), pre-norm.
    Refused with a clear error: register tokens, attention pooling ('map'),
    qk_norm, attention gates, norms inside attn/mlp, patch-embed norm, non-GELU
    MLPs, non-standard blocks, dynamic image size.
    """
    from timm.layers import LayerScale, Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    arch = arch or type(model).__name__
    if not isinstance(model, VisionTransformer):
        _refuse(arch, f"model class {type(model).__name__}")
    if getattr(model, "reg_token", None) is not None:
        _refuse(arch, "register tokens")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        _refuse(arch, f"global_pool='{model.global_pool}'")
    if getattr(model, "dynamic_img_size", False):
        _refuse(arch, "dynamic_img_size")
    if model.pos_embed is None:
        _refuse(arch, "no absolute position embedding")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        _refuse(arch, "a norm inside the patch embedding")
    distilled = getattr(model, "dist_token", None) is not None
    blocks = list(model.blocks)
    E = model.embed_dim
    first = blocks[0]
    H = first.attn.num_heads
    hd = first.attn.head_dim
    M = first.mlp.fc1.out_features
    eps = first.norm1.eps  # every norm of a timm ViT shares it; the final one may be absent (final_norm=False)
    for i, b in enumerate(blocks):
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp:
            _refuse(arch, f"block {i} of type {type(b).__name__}/{type(b.attn).__name__}/{type(b.mlp).__name__}")
        a = b.attn
        if not isinstance(a.q_norm, nn.Identity) or not isinstance(a.k_norm, nn.Identity):
            _refuse(arch, "qk_norm")
        if getattr(a, "gate", None) is not None:
            _refuse(arch, "attention output gates")
        if not isinstance(getattr(a, "norm", nn.Identity()), nn.Identity) or not isinstance(b.mlp.norm, nn.Identity):
            _refuse(arch, "a norm inside attention or the MLP")
        act = b.mlp.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            _refuse(arch, f"MLP activation {act}")
        biases = {a.proj.bias is not None, b.mlp.fc1.bias is not None, b.mlp.fc2.bias is not None}
        if len(biases) != 1 or (a.proj.bias is not None) != (first.attn.proj.bias is not None):
            _refuse(arch, "a mix of biased and bias-free projections")
        if a.num_heads != H or a.head_dim != hd or b.mlp.fc1.out_features != M:
            _refuse(arch, "blocks of unequal width")
        if a.head_dim * a.num_heads != getattr(a, "attn_dim", E) or a.head_dim * a.num_heads != E:
            _refuse(arch, "attention dim different from the embedding dim")
        for ls in (b.ls1, b.ls2):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                _refuse(arch, f"layer scale {type(ls).__name__}")
        for ln in (b.norm1, b.norm2):
            if not isinstance(ln, nn.LayerNorm):
                _refuse(arch, f"block norm {type(ln).__name__}")
    layer_scale = isinstance(first.ls1, LayerScale)
    if any(isinstance(b.ls1, LayerScale) != layer_scale for b in blocks):
        _refuse(arch, "LayerScale in some blocks only")
    pe = model.patch_embed
    return {
        "arch": arch,
        "kwargs": dict(kwargs or {}),
        "img_size": list(pe.img_size),
        "patch_size": list(pe.patch_size),
        "in_chans": pe.proj.in_channels,
        "num_classes": model.num_classes,
        "embed_dim": E,
        "depth": len(blocks),
        "num_heads": H,
        "head_dim": hd,
        "mlp_hidden": M,
        "qkv_bias": first.attn.qkv.bias is not None,
        "proj_bias": first.attn.proj.bias is not None,  # timm's proj_bias: attn.proj, mlp.fc1, mlp.fc2
        "patch_bias": pe.proj.bias is not None,
        "class_token": model.cls_token is not None,
        "dist_token": distilled,
        "no_embed_class": bool(model.no_embed_class),
        "pre_norm": isinstance(model.norm_pre, nn.LayerNorm),
        "final_norm": isinstance(model.norm, nn.LayerNorm),
        "fc_norm": isinstance(model.fc_norm, nn.LayerNorm),
        "global_pool": model.global_pool,
        "layer_scale": layer_scale,
        "norm_eps": eps,
        "scale_head_dim": hd,  # the attention scale stays head_dim**-0.5 of the teacher (NViT)
    }


def canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's weights in CompactViT naming (keep-everything, teacher order).

    The fused ``qkv`` keeps timm's [q; k; v] row order, so a keep-everything
    CompactViT computes exactly timm's ops on exactly timm's tensors.
    """
    describe(model)  # refuse unsupported variants first
    sd: dict[str, torch.Tensor] = {}
    pe = model.patch_embed.proj
    sd["patch_embed.weight"] = pe.weight
    if pe.bias is not None:
        sd["patch_embed.bias"] = pe.bias
    if model.cls_token is not None:
        sd["cls_token"] = model.cls_token
    if getattr(model, "dist_token", None) is not None:
        sd["dist_token"] = model.dist_token
    sd["pos_embed"] = model.pos_embed
    if isinstance(model.norm_pre, nn.LayerNorm):
        sd["norm_pre.weight"], sd["norm_pre.bias"] = model.norm_pre.weight, model.norm_pre.bias
    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = b.norm1.weight, b.norm1.bias
        sd[p + "attn.qkv.weight"] = b.attn.qkv.weight
        if b.attn.qkv.bias is not None:
            sd[p + "attn.qkv.bias"] = b.attn.qkv.bias
        sd[p + "attn.proj.weight"] = b.attn.proj.weight
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = b.norm2.weight, b.norm2.bias
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"] = b.mlp.fc1.weight, b.mlp.fc2.weight
        for name, lin in (("attn.proj", b.attn.proj), ("mlp.fc1", b.mlp.fc1), ("mlp.fc2", b.mlp.fc2)):
            if lin.bias is not None:
                sd[p + name + ".bias"] = lin.bias
        if not isinstance(b.ls1, nn.Identity):
            sd[p + "ls1"], sd[p + "ls2"] = b.ls1.gamma, b.ls2.gamma
    for name in ("norm", "fc_norm"):
        m = getattr(model, name)
        if isinstance(m, nn.LayerNorm):
            sd[name + ".weight"], sd[name + ".bias"] = m.weight, m.bias
    sd["head.weight"], sd["head.bias"] = model.head.weight, model.head.bias
    if getattr(model, "head_dist", None) is not None:
        sd["head_dist.weight"], sd["head_dist.bias"] = model.head_dist.weight, model.head_dist.bias
    return {k: v.detach().clone() for k, v in sd.items()}
