"""The timm adapter: the module that knows timm's ViT module names (:mod:`.hf` maps transformers' onto them).

It creates a timm ViT by name, loads local checkpoints, and describes a teacher
as plain data (:func:`describe`) plus a canonical state dict in CompactViT naming
(:func:`canonical_state`). Everything downstream (slicing, search, export) works
on those two, never on timm modules.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.pipeline.core import hf
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
    if hf.is_hf_folder(cfg.checkpoint):
        hf.apply_norm_eps(model, cfg.checkpoint)
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
            model = timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs)
    except TypeError as e:
        raise UserError("model", f"timm rejected model.kwargs {cfg.kwargs} for '{cfg.arch}': {e}",
                        "remove or rename the offending key in model.kwargs") from None
    return hf.apply_norm_eps(model, cfg.checkpoint) if hf.is_hf_folder(cfg.checkpoint) else model


def read_pretrained_cfg(path: str | os.PathLike) -> dict:
    """A timm ``pretrained_cfg`` stored inside a checkpoint, or ``{}``.

    ``.pth``: a ``pretrained_cfg`` dict beside the state dict (``{"state_dict": ..., "pretrained_cfg": ...}``);
    ``.safetensors``: JSON under the metadata key ``pretrained_cfg``. Only the header / the pickle's
    small objects are read (tensors are memory-mapped where the format allows).
    """
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
    if hf.is_hf_folder(path):  # a transformers save_pretrained folder: its weights in timm's names
        sd = hf.to_timm_state(hf.read_weights(Path(path)), hf.read_config(path))
        hf.apply_norm_eps(model, path)
    else:
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
    err = UserError("model", f"'{arch}': {what} is not supported by vitrim's slicer",
                    "use a plain ViT variant: cls/avg/map pooling, optional dist or register tokens, LayerScale, "
                    "qk_norm, GELU/QuickGELU/GELU-tanh or GLU MLPs, a CNN stem timm builds by name "
                    "(docs/timm-coverage.md lists what is refused)")
    err.reason = what  # the reason alone, for the coverage table
    raise err


def _act_name(act: nn.Module) -> str | None:
    """The spec name of an MLP activation timm builds, or None when vitrim has no compact twin for it."""
    from timm.layers import GELUTanh, QuickGELU

    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    names = {GELUTanh: "gelu_tanh", QuickGELU: "quick_gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}
    return names.get(type(act))


def _describe_pool(arch: str, pool: nn.Module, E: int) -> dict:
    """timm's ``AttentionPoolLatent`` as data (kept whole by the slicer)."""
    from timm.layers import Mlp
    from timm.layers.attention_pool import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        _refuse(arch, f"attention pool {type(pool).__name__}")
    if pool.pos_embed is not None or not isinstance(pool.q, nn.Linear) or type(pool.mlp) is not Mlp:
        _refuse(arch, "an attention pool with its own position embedding, no query projection or no MLP")
    if not isinstance(pool.q_norm, nn.Identity) or pool.pool not in ("token", "avg"):
        _refuse(arch, f"an attention pool with qk_norm or pool type '{pool.pool}'")
    D = pool.q.out_features
    if pool.kv.in_features != E or pool.latent.shape[-1] != D or pool.proj.out_features != D \
            or (pool.q.bias is None) != (pool.kv.bias is None) or pool.proj.bias is None:
        _refuse(arch, "an attention pool whose widths differ from the embedding")
    if not isinstance(pool.norm, (nn.Identity, nn.LayerNorm)) or pool.mlp.fc1.bias is None \
            or not isinstance(pool.mlp.norm, nn.Identity):
        _refuse(arch, f"an attention pool with norm {type(pool.norm).__name__}")
    return {"dim": D, "num_heads": pool.num_heads, "latent_len": pool.latent_len, "qkv_bias": pool.q.bias is not None,
            "norm": isinstance(pool.norm, nn.LayerNorm), "mlp_hidden": pool.mlp.fc1.out_features, "pool": pool.pool,
            "norm_eps": pool.norm.eps if isinstance(pool.norm, nn.LayerNorm) else None,
            "act": _act_name(pool.mlp.act)}


def _stem_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Conv2d]:
    """(CNN stem kept whole or None, the conv that projects to the embedding) of a timm ViT.

    A ``HybridEmbed`` without its own projection (``proj=False``, MobileCLIP's ``ConvStem``) ends its backbone
    with a plain conv (no norm, no activation) to the embedding width: that conv is the projection.
    """
    pe = model.patch_embed
    if not hasattr(pe, "backbone"):
        return None, pe.proj
    if isinstance(pe.proj, nn.Conv2d):
        return pe.backbone, pe.proj
    return nn.Sequential(*list(pe.backbone)[:-1]), pe.backbone[-1].conv


def input_channels(model: nn.Module) -> int:
    """The image channels a timm ViT takes (a hybrid's CNN stem reads the image, its projection the features)."""
    pe = model.patch_embed
    return int(pe.in_chans) if hasattr(pe, "backbone") else int(pe.proj.in_channels)


@functools.lru_cache(maxsize=8)
def _meta_stem(arch: str, kwargs_json: str, proj_in_backbone: bool) -> nn.Module:
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **json.loads(kwargs_json))
    backbone = model.patch_embed.backbone
    return nn.Sequential(*list(backbone)[:-1]) if proj_in_backbone else backbone


def build_stem(stem: dict) -> nn.Module:
    """The CNN stem of a hybrid ViT spec (``spec['stem']``), rebuilt by timm from the teacher's name and kwargs.

    timm's own backbone module (ResNetV2, a ResNet feature extractor, a conv stem), on the ambient default
    device (meta while shapes are checked), zero weights and reset norm statistics: a student loads its
    weights after this.
    """
    meta = _meta_stem(stem["arch"], json.dumps(stem["kwargs"], sort_keys=True), bool(stem.get("proj_in_backbone")))
    m = copy.deepcopy(meta).to_empty(device=torch.get_default_device())
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            t.zero_()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
                mod.reset_running_stats()
    return m


def _signature(m: nn.Module) -> tuple:
    """What must agree between a teacher's stem and timm's rebuild of it: module types and settings, shapes."""
    return repr(m), [(k, tuple(v.shape)) for k, v in m.state_dict().items()]


def _describe_stem(arch: str, model: nn.Module, kwargs: dict | None) -> dict:
    """A hybrid ViT's CNN stem as data: the timm name and kwargs that rebuild it, its output and its cost.

    The stem is kept whole; only the projection after it is sliced (with the embedding).
    """
    import timm
    from timm.layers import ConvNormAct
    from torch.utils.flop_counter import FlopCounterMode

    pe = model.patch_embed
    if not pe.flatten:
        _refuse(arch, f"a hybrid CNN stem with output format {pe.output_fmt}")
    proj_in_backbone = not isinstance(pe.proj, nn.Conv2d)
    if proj_in_backbone:  # the backbone's last layer must be a bare conv: ConvNormAct without norm, act or aa
        bb = pe.backbone
        last = bb[-1] if isinstance(bb, nn.Sequential) and type(bb).forward is nn.Sequential.forward \
            and len(bb) > 1 else None
        if type(last) is not ConvNormAct or type(last.conv) is not nn.Conv2d or type(last.bn) is not nn.Sequential \
                or len(last.bn) or getattr(last, "aa", None) is not None:
            _refuse(arch, "a hybrid CNN stem that does not end in a projection conv")
    stem, proj = _stem_parts(model)
    if type(proj) is not nn.Conv2d or proj.kernel_size != proj.stride or proj.padding != (0, 0) \
            or proj.dilation != (1, 1) or proj.groups != 1 or proj.out_channels != model.embed_dim:
        _refuse(arch, "a hybrid CNN stem whose projection is not a patch conv (kernel = stride, no padding)")
    name = arch if timm.is_model(arch) else (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    if not timm.is_model(name):
        _refuse(arch, "a hybrid CNN stem not built by a timm model name (vitrim rebuilds the stem by name)")
    kw = {**(kwargs or {}), "in_chans": pe.in_chans}
    try:
        json.dumps(kw)
        rebuilt = _meta_stem(name, json.dumps(kw, sort_keys=True), proj_in_backbone)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # timm asserts on some kwargs
        _refuse(arch, f"a hybrid CNN stem that timm cannot rebuild from '{name}' and its kwargs ({e})")
    if _signature(rebuilt) != _signature(stem):
        _refuse(arch, f"a hybrid CNN stem that timm's '{name}' with these kwargs does not rebuild")
    with FlopCounterMode(display=False) as flops, torch.device("meta"):
        out = rebuilt(torch.empty(1, pe.in_chans, *pe.img_size))
    out = out[-1] if isinstance(out, (list, tuple)) else out
    C, fh, fw = (int(d) for d in out.shape[1:])
    ph, pw = proj.kernel_size
    if C != proj.in_channels or fh % ph or fw % pw:
        _refuse(arch, f"a hybrid CNN stem whose {fh}x{fw} output does not tile into {ph}x{pw} patches")
    return {"arch": name, "kwargs": kw, "proj_in_backbone": proj_in_backbone, "out_chans": C,
            "feature_size": [fh, fw], "params": sum(p.numel() for p in rebuilt.parameters()),
            "macs": flops.get_total_flops() // 2}


def describe(model: nn.Module, arch: str = "", kwargs: dict | None = None) -> dict:
    """Describe a timm VisionTransformer as plain data (the Plan's ``spec``).

    Supported: DeiT / ViT with a class token, distilled DeiT (dist token, two
    heads), register tokens, qkv_bias on/off, qk_norm (per-head LayerNorms),
    LayerScale (DeiT-III), ``no_embed_class``, ``global_pool`` 'token', 'avg'
    (with fc_norm) or 'map' (SigLIP's attention pool, kept whole), pre-norm,
    exact GELU, GELU-tanh, QuickGELU and gated (``GluMlp``) MLPs, and
    ``dynamic_img_size`` (fixed at the configured size).
    Hybrid ViTs (timm's ``HybridEmbed``: a CNN backbone, then a conv projection
    to the embedding) keep the backbone whole (:func:`build_stem` rebuilds it
    with timm); the projection is sliced like a plain patch embedding.
    Refused with a clear error (never a crash): other model classes, parallel
    blocks, attention gates, norms inside attn/mlp, patch-embed norm, other
    pools, activations and norms.
    """
    from timm.layers import GluMlp, HybridEmbed, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    arch = arch or type(model).__name__
    if not isinstance(model, VisionTransformer):
        _refuse(arch, f"model class {type(model).__name__}")
    pe = model.patch_embed
    stem = None
    if type(pe) is HybridEmbed:
        stem = _describe_stem(arch, model, kwargs)
    elif type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        _refuse(arch, f"patch embedding {type(pe).__name__}")
    elif not isinstance(pe.norm, nn.Identity):
        _refuse(arch, "a norm inside the patch embedding")
    if getattr(pe, "dynamic_img_pad", False):
        _refuse(arch, "dynamic_img_pad")
    pool = getattr(model, "attn_pool", None)
    if model.global_pool not in ("token", "avg", "map") or (model.global_pool == "map") != (pool is not None):
        _refuse(arch, f"global_pool='{model.global_pool}'")
    if model.pos_embed is None:
        _refuse(arch, "no absolute position embedding")
    distilled = getattr(model, "dist_token", None) is not None
    reg = getattr(model, "reg_token", None)
    R = 0 if reg is None else int(reg.shape[1])
    if distilled and R:
        _refuse(arch, "a distillation token with register tokens")
    blocks = list(model.blocks)
    for i, b in enumerate(blocks):
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) not in (Mlp, GluMlp):
            attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
            _refuse(arch, f"block {i} of type {type(b).__name__}/{type(attn).__name__}/{type(mlp).__name__}")
    E = model.embed_dim
    first = blocks[0]
    H = first.attn.num_heads
    hd = first.attn.head_dim
    M = first.mlp.fc2.in_features
    glu = None
    if type(first.mlp) is GluMlp:
        glu = "last" if first.mlp.gate_last else "first"
    eps = first.norm1.eps  # every norm of a timm ViT shares it; the final one may be absent (final_norm=False)
    act_name = _act_name(first.mlp.act)
    qk_norm = not isinstance(first.attn.q_norm, nn.Identity)
    for i, b in enumerate(blocks):
        a = b.attn
        if type(b.mlp) is not type(first.mlp) or (glu and (b.mlp.gate_last != first.mlp.gate_last
                                                           or b.mlp.chunk_dim != -1)):
            _refuse(arch, "blocks with different MLP types")
        for qn in (a.q_norm, a.k_norm):
            if not (isinstance(qn, nn.Identity) if not qk_norm else
                    (isinstance(qn, nn.LayerNorm) and qn.eps == eps and qn.weight is not None)):
                _refuse(arch, f"qk_norm {type(qn).__name__} (LayerNorms in every block, or none, are supported)")
        if getattr(a, "gate", None) is not None:
            _refuse(arch, "attention output gates")
        if not isinstance(getattr(a, "norm", nn.Identity()), nn.Identity) or not isinstance(b.mlp.norm, nn.Identity):
            _refuse(arch, "a norm inside attention or the MLP")
        act = b.mlp.act
        name = _act_name(act)
        if name is None or name != act_name or (name in ("silu", "sigmoid") and not glu):
            _refuse(arch, f"MLP activation {type(act).__name__}")
        biases = {a.proj.bias is not None, b.mlp.fc1.bias is not None, b.mlp.fc2.bias is not None}
        if len(biases) != 1 or (a.proj.bias is not None) != (first.attn.proj.bias is not None):
            _refuse(arch, "a mix of biased and bias-free projections")
        if a.num_heads != H or a.head_dim != hd or b.mlp.fc2.in_features != M:
            _refuse(arch, "blocks of unequal width")
        if a.head_dim * a.num_heads != getattr(a, "attn_dim", E) or a.head_dim * a.num_heads != E:
            _refuse(arch, "attention dim different from the embedding dim")
        for ls in (b.ls1, b.ls2):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                _refuse(arch, f"layer scale {type(ls).__name__}")
        for ln in (b.norm1, b.norm2):
            if not isinstance(ln, nn.LayerNorm) or ln.eps != eps:
                _refuse(arch, f"block norm {type(ln).__name__}")
    layer_scale = isinstance(first.ls1, LayerScale)
    if any(isinstance(b.ls1, LayerScale) != layer_scale for b in blocks):
        _refuse(arch, "LayerScale in some blocks only")
    for name in ("norm_pre", "norm", "fc_norm"):
        m = getattr(model, name)
        if not isinstance(m, nn.Identity) and not (isinstance(m, nn.LayerNorm) and m.eps == eps):
            _refuse(arch, f"{name} {type(m).__name__}")
    spec_pool = None
    if pool is not None:
        spec_pool = _describe_pool(arch, pool, E)
        if spec_pool.pop("act") != act_name or spec_pool.pop("norm_eps") not in (None, eps) or glu:
            _refuse(arch, "an attention pool whose MLP or norm differs from the blocks'")
    for head in (model.head, getattr(model, "head_dist", None)):  # num_classes=0: a feature extractor
        if head is not None and not isinstance(head, (nn.Linear, nn.Identity)):
            _refuse(arch, f"a classifier head {type(head).__name__}")
    proj = _stem_parts(model)[1]
    spec = {
        "arch": arch,
        "kwargs": dict(kwargs or {}),
        "img_size": list(pe.img_size),
        "patch_size": list(proj.kernel_size if stem else pe.patch_size),  # a hybrid's: on the stem's feature map
        "in_chans": pe.in_chans if stem else proj.in_channels,
        "num_classes": model.num_classes,
        "embed_dim": E,
        "depth": len(blocks),
        "num_heads": H,
        "head_dim": hd,
        "mlp_hidden": M,
        "qkv_bias": first.attn.qkv.bias is not None,
        "proj_bias": first.attn.proj.bias is not None,  # timm's proj_bias: attn.proj, mlp.fc1, mlp.fc2
        "patch_bias": proj.bias is not None,
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
    # keys of the variants added later, present only when they are not the default, so older plans still match
    extra = {"reg_tokens": R, "qk_norm": qk_norm, "mlp_act": act_name if act_name != "gelu" else None,
             "mlp_glu": glu, "attn_pool": spec_pool,
             "pool_include_prefix": bool(getattr(model, "pool_include_prefix", False)),
             "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)), "stem": stem}
    spec.update({k: v for k, v in extra.items() if v})
    return spec


def canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's weights in CompactViT naming (keep-everything, teacher order).

    The fused ``qkv`` keeps timm's [q; k; v] row order, so a keep-everything
    CompactViT computes exactly timm's ops on exactly timm's tensors.
    """
    describe(model)  # refuse unsupported variants first
    sd: dict[str, torch.Tensor] = {}
    stem, pe = _stem_parts(model)
    if stem is not None:  # kept whole
        sd.update({"stem." + k: v for k, v in stem.state_dict(keep_vars=True).items()})
    sd["patch_embed.weight"] = pe.weight
    if pe.bias is not None:
        sd["patch_embed.bias"] = pe.bias
    if model.cls_token is not None:
        sd["cls_token"] = model.cls_token
    if getattr(model, "dist_token", None) is not None:
        sd["dist_token"] = model.dist_token
    if getattr(model, "reg_token", None) is not None:
        sd["reg_token"] = model.reg_token
    sd["pos_embed"] = model.pos_embed
    if isinstance(model.norm_pre, nn.LayerNorm):
        sd["norm_pre.weight"], sd["norm_pre.bias"] = model.norm_pre.weight, model.norm_pre.bias
    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = b.norm1.weight, b.norm1.bias
        sd[p + "attn.qkv.weight"] = b.attn.qkv.weight
        if b.attn.qkv.bias is not None:
            sd[p + "attn.qkv.bias"] = b.attn.qkv.bias
        if isinstance(b.attn.q_norm, nn.LayerNorm):
            sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"] = b.attn.q_norm.weight, b.attn.q_norm.bias
            sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"] = b.attn.k_norm.weight, b.attn.k_norm.bias
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
    if getattr(model, "attn_pool", None) is not None:
        sd.update({"attn_pool." + k: v for k, v in model.attn_pool.state_dict(keep_vars=True).items()})
    for name in ("head", "head_dist"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Linear):
            sd[name + ".weight"], sd[name + ".bias"] = m.weight, m.bias
    return {k: v.detach().clone() for k, v in sd.items()}
