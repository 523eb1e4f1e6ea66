"""Preprocessing is part of the model: resolved once, printed, and recorded with every result.

A checkpoint is only as good as the transforms it is evaluated with: a ViT trained at 32x32 with
ImageNet mean/std and no crop loses over 20 points under timm's default centre crop 0.9 and the
architecture's mean/std 0.5 (issue 21). :func:`resolve_preprocessing` resolves every field once, and
records where each came from. Highest priority first:

1. the config's explicit ``data.*`` keys (``mean``, ``std``, ``interpolation``, ``crop_pct``,
   ``crop_mode``): what the user writes wins;
2. the checkpoint's own config: ``config.json`` beside ``model.checkpoint`` (the format timm's
   ``save_for_hf`` / ``push_to_hf_hub`` write: a ``pretrained_cfg`` section, or the legacy flat
   keys), then a ``pretrained_cfg`` dict stored in the checkpoint itself (a key of a ``.pth`` dict,
   or JSON in the ``.safetensors`` metadata); for a Hugging Face transformers folder, its
   ``preprocessor_config.json`` (:func:`vitrim.pipeline.core.hf.read_preprocessor`);
3. timm's defaults for the architecture (its ``pretrained_cfg``, as ``timm.data.resolve_data_config``
   reads it).

The input size and channel count are the model's own, as built from ``model.arch`` and
``model.kwargs``; a checkpoint config that names another size is refused rather than ignored. The
embedded Fashion-MNIST default has one fixed preprocessing (28x28 L, mean 0.2860, std 0.3530, no
resize or crop), recorded with the same object.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vitrim.pipeline.core import hf
from vitrim.pipeline.core.config import DataConfig, ModelConfig
from vitrim.pipeline.core.errors import UserError

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
CROP_MODES = ("center", "squash", "border")
TRANSFORM_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")  # the data.* keys that override

SRC_DATA = "data.* keys"
SRC_MODEL = "model (as built)"
SRC_FIXED = "fixed for data.name=fmnist"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (inference; training adds augmentation).

    Decode the image as ``channels``; resize to ``resize`` (see :meth:`steps`) with ``interpolation``;
    crop to ``input_size`` (``crop_pct`` of the resized image, ``crop_mode``); scale the pixels to
    ``value_range``; subtract ``mean`` and divide by ``std`` per channel; stack as ``layout`` ``dtype``.
    ``sources`` names, per field, where its value came from.
    """

    input_size: tuple[int, int, int]  # (C, H, W) the model takes
    resize: Optional[tuple[int, int]]  # the size before the crop; None: images are taken as they are
    crop_pct: float
    crop_mode: str  # center | squash | border | none
    interpolation: Optional[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: str  # RGB | L
    layout: str = "NCHW"
    dtype: str = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)  # pixels / 255, before (x - mean) / std
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.data.create_transform`` (the ImageFolder transforms)."""
        return {"input_size": tuple(self.input_size), "interpolation": self.interpolation, "mean": tuple(self.mean),
                "std": tuple(self.std), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def steps(self) -> list[str]:
        """The recipe in words, for whoever feeds the engine outside vitrim."""
        C, H, W = self.input_size
        out = [f"decode as {self.channels} ({C} channel{'s' if C > 1 else ''})"]
        if self.resize is None:
            out.append(f"no resize or crop: images are {H}x{W} already")
        elif self.crop_mode == "squash":
            out += [f"resize to {self.resize[0]}x{self.resize[1]} ({self.interpolation}), aspect ratio not kept",
                    f"center-crop {H}x{W}"]
        elif self.crop_mode == "border":
            out += [f"resize the longer side to {max(self.resize)} ({self.interpolation}), aspect ratio kept",
                    f"center-crop or pad (with the mean colour) to {H}x{W}"]
        else:
            side = "the shorter side to " + str(self.resize[0]) if self.resize[0] == self.resize[1] else \
                f"to {self.resize[0]}x{self.resize[1]}"
            out += [f"resize {side} ({self.interpolation})", f"center-crop {H}x{W}"]
        lo, hi = self.value_range
        out += [f"scale pixels to [{lo:g}, {hi:g}] (divide by 255)", "subtract mean, divide by std, per channel",
                f"{self.layout} {self.dtype}"]
        return out

    def to_dict(self) -> dict:
        """JSON/YAML-friendly: the fields, the recipe and each field's source."""
        return {"input_size": list(self.input_size), "resize": list(self.resize) if self.resize else None,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "channels": self.channels, "layout": self.layout,
                "dtype": self.dtype, "value_range": list(self.value_range), "steps": self.steps(),
                "sources": dict(self.sources)}

    def key(self) -> dict:
        """The fields that change the model's input (for cache keys): everything but the sources."""
        d = self.to_dict()
        d.pop("sources")
        d.pop("steps")
        return d

    def line(self) -> str:
        """One line: ``preprocessing: 32x32 RGB, resize 32 bicubic, crop 1.0 (center), mean ... [sources]``."""
        C, H, W = self.input_size
        if self.resize is None:
            how = "no resize, no crop"
        else:
            size = str(self.resize[0]) if self.resize[0] == self.resize[1] else f"{self.resize[0]}x{self.resize[1]}"
            how = f"resize {size} {self.interpolation}, crop {self.crop_pct} ({self.crop_mode})"
        by_src: dict[str, list[str]] = {}
        for k, src in self.sources.items():
            by_src.setdefault(src, []).append(k)
        srcs = "; ".join(f"{s}: {', '.join(ks)}" for s, ks in by_src.items())
        return (f"preprocessing: {H}x{W} {self.channels}, {how}, mean {_fmt(self.mean)} std {_fmt(self.std)}, "
                f"{self.layout} {self.dtype} in [{self.value_range[0]:g},{self.value_range[1]:g}] [{srcs}]")


def _fmt(v: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


FMNIST_PREPROCESSING = Preprocessing(
    input_size=(1, 28, 28), resize=None, crop_pct=1.0, crop_mode="none", interpolation=None,
    mean=(FMNIST_MEAN,), std=(FMNIST_STD,), channels="L",
    sources={k: SRC_FIXED for k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")})


def read_checkpoint_config(model_cfg: Optional[ModelConfig]) -> tuple[dict, dict]:
    """The preprocessing keys the checkpoint carries: ``({key: value}, {key: source})``.

    ``config.json`` beside ``model.checkpoint`` wins over a ``pretrained_cfg`` stored in the
    checkpoint file. A ``config.json`` naming another architecture is refused: it is not this
    checkpoint's.
    """
    from vitrim.pipeline.core.models import read_pretrained_cfg

    if model_cfg is None or not model_cfg.checkpoint:
        return {}, {}
    ckpt = Path(model_cfg.checkpoint)
    values: dict = {}
    sources: dict = {}
    if hf.is_hf_folder(ckpt):  # a transformers folder: its image processor's file
        pcfg = hf.read_preprocessor(ckpt)
        _take(pcfg, f"preprocessor_config.json ({ckpt / 'preprocessor_config.json'})", values, sources)
        return values, sources
    embedded = read_pretrained_cfg(ckpt)
    if embedded:
        _take(embedded, f"pretrained_cfg in {ckpt}", values, sources)
    cj = ckpt.parent / "config.json"
    if cj.is_file():
        try:
            obj = json.loads(cj.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError("data", f"'{cj}' beside the checkpoint is not valid JSON ({e})",
                            "fix or remove it (timm's save_for_hf writes it)") from None
        if not isinstance(obj, dict):
            raise UserError("data", f"'{cj}' beside the checkpoint is not a JSON object",
                            "fix or remove it (timm's save_for_hf writes it)")
        arch = obj.get("architecture")
        if isinstance(arch, str) and arch.split(".")[0] != model_cfg.arch.split(".")[0]:
            raise UserError("data", f"'{cj}' beside the checkpoint is for architecture '{arch}', but model.arch is "
                            f"'{model_cfg.arch}'", f"set model.arch: {arch.split('.')[0]}, or move that config.json "
                            "away if it belongs to another model")
        pcfg = obj["pretrained_cfg"] if isinstance(obj.get("pretrained_cfg"), dict) else obj  # legacy: flat keys
        _take(pcfg, f"config.json ({cj})", values, sources)
    return values, sources


def _take(pcfg: dict, src: str, values: dict, sources: dict) -> None:
    """Copy the preprocessing keys of a timm ``pretrained_cfg``, checking their types."""
    from timm.data.transforms import str_to_pil_interp

    for key in ("input_size", *TRANSFORM_KEYS):
        v = pcfg.get(key)
        if v is None:
            continue
        ok = True
        if key in ("mean", "std"):
            v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
            ok = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v) and len(v) > 0
            v = tuple(float(a) for a in v) if ok else v
        elif key == "input_size":
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(a, int) and a > 0 for a in v)
            v = tuple(v) if ok else v
        elif key == "crop_pct":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
            v = float(v) if ok else v
        elif key == "crop_mode":
            ok = v in CROP_MODES
        elif key == "interpolation":
            try:
                str_to_pil_interp(v)
            except (KeyError, TypeError):
                ok = False
        if not ok:
            raise UserError("data", f"{src}: '{key}' is {v!r}, which vitrim cannot use",
                            f"fix '{key}' there, or override it with data.{key}" if key != "input_size"
                            else "fix 'input_size' there ([channels, height, width])")
        values[key], sources[key] = v, src


def resolve_preprocessing(data: DataConfig, model_cfg: Optional[ModelConfig] = None,
                          model: Any = None) -> Preprocessing:
    """Resolve the preprocessing once (see the module docstring for the order).

    Args:
        data: the data config (``data.*`` keys win).
        model_cfg: the teacher's config; ``model.checkpoint`` locates ``config.json``. Also builds
            the architecture on the meta device when ``model`` is not given.
        model: the teacher (or its meta-device twin): its input size, channels and timm defaults.
    """
    if data.name == "fmnist":
        return FMNIST_PREPROCESSING
    import timm.data

    from vitrim.pipeline.core.models import input_channels, meta_model

    if model is None:
        model = meta_model(model_cfg)
    arch = getattr(model_cfg, "arch", None) or type(model).__name__
    pe = model.patch_embed
    C = input_channels(model)
    H, W = (int(s) for s in pe.img_size)
    if C not in (1, 3):
        raise UserError("data", f"the teacher takes {C} input channels; image folders give RGB (3) or L (1)",
                        "use in_chans 1 or 3 in model.kwargs")
    timm_src = f"timm default for {arch}"
    d = timm.data.resolve_data_config({}, model=model)
    values = {k: d[k] for k in TRANSFORM_KEYS}
    sources = {k: timm_src for k in TRANSFORM_KEYS}
    ck_values, ck_sources = read_checkpoint_config(model_cfg)
    if "input_size" in ck_values and tuple(ck_values["input_size"]) != (C, H, W):
        raise UserError("data", f"{ck_sources['input_size']} says input_size {list(ck_values['input_size'])}, but "
                        f"the model as built takes {[C, H, W]}", "set model.kwargs (img_size, in_chans) to the size "
                        "the checkpoint was trained at, or correct input_size in that file")
    ck_values.pop("input_size", None)
    values.update(ck_values)
    sources.update({k: ck_sources[k] for k in ck_values})
    for key in TRANSFORM_KEYS:
        v = getattr(data, key)
        if v is not None:
            values[key], sources[key] = v, SRC_DATA
    for key in ("mean", "std"):
        v = values[key]
        v = tuple(float(a) for a in (v if isinstance(v, (list, tuple)) else [v]))
        if len(v) != C:
            if sources[key] == timm_src and C == 1:
                v = (sum(v) / len(v),)  # a grayscale teacher: the architecture's RGB statistics averaged
            else:
                where = f"data.{key}" if sources[key] == SRC_DATA else f"'{key}' in {sources[key]}"
                raise UserError("data", f"{where} has {len(v)} values but the teacher takes {C} channels",
                                f"give {where.split(' in ')[0]} one value per input channel")
        values[key] = v
    crop_pct = float(values["crop_pct"])
    resize = (math.floor(H / crop_pct), math.floor(W / crop_pct))  # timm's eval transform: scale size, then crop
    return Preprocessing(input_size=(C, H, W), resize=resize, crop_pct=crop_pct, crop_mode=values["crop_mode"],
                         interpolation=values["interpolation"], mean=values["mean"], std=values["std"],
                         channels="L" if C == 1 else "RGB",
                         sources={"input_size": SRC_MODEL, **{k: sources[k] for k in TRANSFORM_KEYS}})


def check_expected_top1(model_cfg: ModelConfig, top1: float, images: int, prep: Optional[Preprocessing],
                        split: str = "test") -> Optional[str]:
    """Stop (exit 2) when the teacher evaluates more than the tolerance below ``model.expected_top1``.

    A checkpoint that scores far below what its owner measured is, most often, fed other
    transforms than it was trained with; minutes of search and fine-tuning on it would be wasted.

    Returns:
        A line for the log when ``model.expected_top1`` is set and met; None when it is not set.

    Raises:
        UserError: naming the preprocessing and the keys that set it.
    """
    exp = model_cfg.expected_top1
    if exp is None:
        return None
    tol = model_cfg.expected_top1_tolerance
    if top1 >= exp - tol:
        return (f"[teacher] {split} top-1 {top1:.2f}% is within {tol:g} pt of model.expected_top1={exp:g}"
                + (" (or above)" if top1 > exp else ""))
    used = prep.line() if prep is not None else "preprocessing: unknown"
    what = (f"the teacher evaluates {top1:.2f}% top-1 on the {split} split ({images} images), {exp - top1:.2f} pt "
            f"below model.expected_top1={exp:g} (tolerance model.expected_top1_tolerance={tol:g} pt). The likely "
            f"cause is the transforms: vitrim evaluated with\n  {used}")
    if prep is not None and set(prep.sources.values()) == {SRC_FIXED}:
        fix = ("data.name=fmnist has a fixed preprocessing (28x28, mean 0.2860, std 0.3530): check that "
               "model.checkpoint and model.kwargs are the model you measured, or lower model.expected_top1")
    else:
        fix = ("set the transforms your own loop used: data.crop_pct (1.0 = no crop), data.mean, data.std, "
               "data.interpolation, data.crop_mode; or put the checkpoint's config.json (timm's save_for_hf, "
               "with its pretrained_cfg) beside model.checkpoint. If the transforms match, check the data and the "
               "weights, or lower model.expected_top1")
    raise UserError("teacher", what, fix)


def check_chance(model_cfg: Any, top1: float, images: int, num_classes: int, augment: dict | None = None,
                 prep: Preprocessing | None = None, split: str = "test") -> str:
    """Refuse a teacher whose top-1 is near chance, the level a model that learned nothing reaches.

    Near chance is under ``(1 + model.chance_margin)`` times chance (``100 / num_classes`` %), or not above
    chance by a one-sided exact binomial test at p < 0.01 on the ``images`` evaluated. Compressing such a
    teacher only spends time: its students inherit nothing. The usual causes are augmentation too strong for
    the images (timm's ImageNet crops of a small image), too few epochs, or transforms other than the
    checkpoint was trained with.

    Returns:
        A line for the log (the check passed, or ``model.chance_check`` is false and this is a warning).

    Raises:
        UserError: naming the training transform, the evaluation preprocessing and the keys that set them.
    """
    from scipy.stats import binomtest

    chance = 100.0 / num_classes
    margin = model_cfg.chance_margin
    k = min(images, max(0, round(top1 * images / 100)))
    p = binomtest(k, images, 1.0 / num_classes, alternative="greater").pvalue if images else 1.0
    floor = (1 + margin) * chance
    figure = (f"the teacher's {split} top-1 {top1:.2f}% ({k}/{images} images), chance {chance:.2f}% "
              f"({num_classes} classes)")
    reasons = []
    if top1 < floor:
        reasons.append(f"under {1 + margin:g}x chance = {floor:.2f}% (model.chance_margin={margin:g})")
    if p >= 0.01:
        reasons.append(f"not above chance by a one-sided binomial test (p = {p:.3g} >= 0.01)")
    if not reasons:
        return f"[teacher] {figure}: clearly above chance (binomial p = {p:.2g})"
    what = f"{figure} is near chance: {'; '.join(reasons)}"
    if not model_cfg.chance_check:
        return f"[teacher] WARNING: {what}; going on (model.chance_check=false)"
    used = prep.line() if prep is not None else "preprocessing: unknown"
    aug = ("Fashion-MNIST in memory, horizontal flips (data.augment.hflip)" if augment is None else
           "timm.data.create_transform(is_training=True) with " + ", ".join(f"{k}={v}" for k, v in augment.items()))
    what += (f". A student learns from its teacher, and this one is hard to tell from chance. It was evaluated with\n  {used}\n"
             f"and a teacher trained by vitrim trains with\n  {aug}")
    fix = ("milder training augmentation: data.augment.scale (e.g. [0.6, 1]: crops keep 60% or more of the image), "
           "data.augment.ratio, data.augment.color_jitter (0: off), data.augment.auto_augment (null: off), "
           "data.augment.re_prob (0: off), data.augment.hflip/vflip; or more epochs (teacher.epochs, teacher.lr); "
           "for a checkpoint trained elsewhere, the evaluation transforms (data.mean, data.std, data.crop_pct, "
           "data.interpolation) and model.expected_top1. Check the labels (one class a folder). To go on with "
           "this teacher anyway: model.chance_check=false")
    raise UserError("teacher", what, fix)
