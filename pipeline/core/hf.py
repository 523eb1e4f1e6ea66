"""Hugging Face transformers ViT / DeiT checkpoints in: a ``save_pretrained`` folder as an equivalent timm ViT.

A folder given as ``model.checkpoint`` (with ``model.arch`` left out) holds ``config.json`` (its
``model_type`` and ``architectures`` say what it is), the weights (``model.safetensors``, sharded
safetensors with their index, or ``pytorch_model.bin``) and usually ``preprocessor_config.json``.
Accepted: ``ViTForImageClassification``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher``; any other ``model_type`` is refused (exit 2).

The conversion is exact: the timm model computes the same function. What differs from transformers:

* q, k and v are separate ``Linear`` layers in transformers and one fused ``qkv`` in timm ([q; k; v]).
* transformers' LayerNorms default to ``eps=1e-12``; timm's ViT to 1e-6. The converted model takes the
  checkpoint's ``layer_norm_eps`` (:func:`apply_norm_eps`, applied wherever the model is built).
* ``DeiTForImageClassification`` classifies from the class token alone, while timm's distilled DeiT
  averages its two heads at inference; the converted ``head`` holds twice the classifier and ``head_dist``
  zeros, so the average is the classifier's output exactly (scaling by 2 is exact in floating point).
  ``...WithTeacher`` maps its two classifiers to the two heads.

Preprocessing (:func:`read_preprocessor`): the image processor's mean, std, resample and sizes become the
checkpoint's entries in vitrim's precedence (``data.*`` keys still win). Its resize to a fixed
height x width (no aspect ratio kept) then an optional centre crop is timm's ``crop_mode='squash'``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vitrim.pipeline.core.errors import UserError

ARCHS = {  # model_type -> (architectures accepted, the timm family the folder converts to)
    "vit": (("ViTForImageClassification",), "vit_base_patch16_224"),
    "deit": (("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
             "deit_base_distilled_patch16_224"),
}
ACTS = {"gelu": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
FIX = "give a folder written by save_pretrained of ViTForImageClassification or DeiTForImageClassification"


def is_hf_folder(path: Optional[str | os.PathLike]) -> bool:
    """A checkpoint that is a folder with a ``config.json`` naming a ``model_type``."""
    if not path or not Path(path).is_dir():
        return False
    return "model_type" in _read_json(Path(path) / "config.json", required=False)


def _read_json(p: Path, required: bool = True) -> dict:
    if not p.is_file():
        if required:
            raise UserError("model", f"'{p}' not found", FIX)
        return {}
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError("model", f"'{p}' is not valid JSON ({e})", FIX) from None
    if not isinstance(obj, dict):
        raise UserError("model", f"'{p}' is not a JSON object", FIX)
    return obj


def read_config(folder: str | os.PathLike) -> dict:
    """The folder's ``config.json``, refused unless it is a ViT/DeiT image classifier vitrim converts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("model", f"checkpoint folder '{folder}' not found", FIX)
    cfg = _read_json(folder / "config.json")
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise UserError("model", f"'{folder}/config.json' has model_type {mt!r}; vitrim converts only "
                        f"{', '.join(repr(k) for k in ARCHS)} (ViT, DeiT) Hugging Face checkpoints", FIX)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHS[mt][0]:
        raise UserError("model", f"'{folder}/config.json' is a {arch or 'headless'} model, not an image classifier "
                        f"({' or '.join(ARCHS[mt][0])})",
                        "save the model with its classification head (e.g. ViTForImageClassification)")
    if cfg.get("hidden_act", "gelu") not in ACTS:
        raise UserError("model", f"'{folder}/config.json': hidden_act {cfg.get('hidden_act')!r} has no timm twin",
                        f"vitrim converts hidden_act {', '.join(ACTS)}")
    return cfg


def timm_arch_and_kwargs(cfg: dict) -> tuple[str, dict]:
    """The timm model name and constructor kwargs equivalent to a transformers ViT/DeiT config."""
    E, M = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    kw = {"img_size": int(cfg.get("image_size", 224)), "patch_size": int(cfg.get("patch_size", 16)),
          "in_chans": int(cfg.get("num_channels", 3)), "num_classes": len(cfg.get("id2label") or {}) or 2,
          "embed_dim": E, "depth": int(cfg["num_hidden_layers"]), "num_heads": int(cfg["num_attention_heads"]),
          "mlp_ratio": M / E, "qkv_bias": bool(cfg.get("qkv_bias", True))}
    if int(E * kw["mlp_ratio"]) != M:
        raise UserError("model", f"intermediate_size {M} is not a width timm builds from hidden_size {E}",
                        "convert the checkpoint by hand")
    act = ACTS[cfg.get("hidden_act", "gelu")]
    if act:
        kw["act_layer"] = act
    return ARCHS[cfg["model_type"]][1], kw


def apply_norm_eps(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Give every LayerNorm of the converted model the checkpoint's ``layer_norm_eps``."""
    eps = float(read_config(folder).get("layer_norm_eps", 1e-12))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return model


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's state dict: ``model.safetensors``, its shards (with the index), or ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    files = []
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = sorted({folder / f for f in _read_json(index).get("weight_map", {}).values()})
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    if not files:
        raise UserError("model", f"'{folder}' holds no weights (model.safetensors or pytorch_model.bin)", FIX)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)) if f.suffix == ".safetensors"
                      else torch.load(str(f), map_location="cpu", weights_only=True))
        except Exception as e:  # safetensors / pickle raise many types for a corrupt file
            raise UserError("model", f"'{f}' could not be read ({type(e).__name__}: {e})",
                            "the file is corrupt; save the model again") from None
    return sd


# transformers 4's names (what save_pretrained writes) -> transformers 5's in-memory names, per layer
_LEGACY = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
           "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def to_timm_state(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """A transformers ViT/DeiT classifier's state dict in timm's names (fused qkv)."""
    mt = cfg["model_type"]
    sd = {k: v for k, v in sd.items()}
    for k in list(sd):  # one naming: transformers 5's
        if ".encoder.layer." in k:
            head, rest = k.split(".encoder.layer.", 1)
            i, name = rest.split(".", 1)
            for old, new in _LEGACY.items():
                if name.startswith(old + "."):
                    name = new + name[len(old):]
                    break
            sd[f"{head}.layers.{i}.{name}"] = sd.pop(k)
    p = mt + "."
    try:
        out = {"cls_token": sd.pop(p + "embeddings.cls_token"), "pos_embed": sd.pop(p + "embeddings.position_embeddings"),
               "patch_embed.proj.weight": sd.pop(p + "embeddings.patch_embeddings.projection.weight"),
               "patch_embed.proj.bias": sd.pop(p + "embeddings.patch_embeddings.projection.bias"),
               "norm.weight": sd.pop(p + "layernorm.weight"), "norm.bias": sd.pop(p + "layernorm.bias")}
        if mt == "deit":
            out["dist_token"] = sd.pop(p + "embeddings.distillation_token")
        for i in range(int(cfg["num_hidden_layers"])):
            s, d = f"{p}layers.{i}.", f"blocks.{i}."
            out[d + "attn.qkv.weight"] = torch.cat([sd.pop(s + f"attention.{n}_proj.weight") for n in "qkv"])
            if cfg.get("qkv_bias", True):
                out[d + "attn.qkv.bias"] = torch.cat([sd.pop(s + f"attention.{n}_proj.bias") for n in "qkv"])
            for src, dst in (("attention.o_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                             ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                out[d + dst + ".weight"], out[d + dst + ".bias"] = sd.pop(s + src + ".weight"), sd.pop(s + src + ".bias")
        if "cls_classifier.weight" in sd:  # DeiTForImageClassificationWithTeacher: the two heads, averaged
            for src, dst in (("cls_classifier", "head"), ("distillation_classifier", "head_dist")):
                out[dst + ".weight"], out[dst + ".bias"] = sd.pop(src + ".weight"), sd.pop(src + ".bias")
        elif mt == "deit":  # the class token's classifier alone, as timm's average of two heads (see above)
            w, b = sd.pop("classifier.weight"), sd.pop("classifier.bias")
            out.update({"head.weight": w * 2, "head.bias": b * 2, "head_dist.weight": torch.zeros_like(w),
                        "head_dist.bias": torch.zeros_like(b)})
        else:
            out["head.weight"], out["head.bias"] = sd.pop("classifier.weight"), sd.pop("classifier.bias")
    except KeyError as e:
        raise UserError("model", f"the checkpoint lacks the weight {e} of a {cfg.get('architectures')} model",
                        "save the whole model with save_pretrained") from None
    sd.pop(p + "embeddings.mask_token", None)  # masked-image-modelling only; classification never reads it
    if sd:
        raise UserError("model", f"the checkpoint has weights vitrim does not convert: {sorted(sd)[:4]}",
                        "save a plain ViTForImageClassification / DeiTForImageClassification")
    return out


def read_preprocessor(folder: str | os.PathLike) -> dict:
    """The image processor's preprocessing as timm ``pretrained_cfg`` keys (``{}`` without the file)."""
    p = Path(folder) / "preprocessor_config.json"
    pc = _read_json(p, required=False)
    if not pc:
        return {}
    out: dict = {}
    if pc.get("do_normalize", True):
        if "image_mean" in pc:
            out["mean"] = pc["image_mean"]
        if "image_std" in pc:
            out["std"] = pc["image_std"]
    else:
        out["mean"], out["std"] = [0.0], [1.0]
    if pc.get("do_rescale", True) and abs(float(pc.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise UserError("data", f"'{p}': rescale_factor {pc['rescale_factor']} is not 1/255",
                        "vitrim scales pixels to [0, 1]; fix the file or convert the checkpoint by hand")
    if "resample" in pc:
        out["interpolation"] = PIL_RESAMPLE.get(pc["resample"], pc["resample"])
    size = pc.get("size") or {}
    crop = pc.get("crop_size") if pc.get("do_center_crop") else None
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if "height" in size and "width" in size:
        h, w = (crop["height"], crop["width"]) if crop else (size["height"], size["width"])
        out["crop_mode"] = "squash"  # resize to height x width, aspect ratio not kept, then the centre crop
        out["crop_pct"] = h / size["height"]
        if crop and w / size["width"] != out["crop_pct"]:
            raise UserError("data", f"'{p}': crop_size and size have different ratios per side",
                            "set data.crop_pct and data.crop_mode yourself")
    elif "shortest_edge" in size:
        if not crop:
            raise UserError("data", f"'{p}': a shortest_edge resize without a centre crop gives images of any shape",
                            "set data.crop_pct and data.crop_mode yourself")
        h, w = crop["height"], crop["width"]
        out["crop_mode"], out["crop_pct"] = "center", h / size["shortest_edge"]
    else:
        return out
    out["input_size"] = [int(read_config(folder).get("num_channels", 3)), int(h), int(w)]  # checked against the model
    return out
