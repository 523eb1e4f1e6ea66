"""Configs: one dataclass per stage, loaded from one YAML file.

``load_config(path, overrides=["search.budget_fraction=0.4"])`` reads the YAML,
applies ``--set`` style overrides, and checks every key and type. Unknown keys
and wrong types raise :class:`~vitrim.pipeline.core.errors.UserError` naming the dotted key.
The resolved config is written next to the outputs (timm writes ``args.yaml``).

Budgets (``search.budget_ms | budget_fraction | flops_fraction | params_fraction``)
are one choice, not four settings: two set in the same layer (the YAML file, or
the ``--set`` overrides) are refused, naming both keys, rather than one silently
winning. A budget given with ``--set`` replaces the file's budget (so
``vitrim run configs/fmnist_cpu.yaml --set search.budget_ms=8`` works although
the file sets ``budget_fraction``). When no layer sets one,
``budget_fraction = DEFAULT_BUDGET_FRACTION``, written into the resolved config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vitrim.pipeline.core.errors import UserError

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
BUDGET_KEYS = ("budget_ms", "budget_fraction", "flops_fraction", "params_fraction")
DEFAULT_BUDGET_FRACTION = 0.5  # used only when no budget key is set anywhere


@dataclass
class AugmentConfig:
    """Training augmentation of an image folder: ``timm.data.create_transform(is_training=True)``'s arguments.

    ``null`` picks a default that suits the teacher's input size (:func:`vitrim.pipeline.core.data.resolve_augment`):
    timm's ImageNet recipe (random-resized crops down to 8% of the image, colour jitter 0.4) from 160 px up, and
    milder crops without colour jitter below, where an 8% crop of a 32 px image is 9 px. Fashion-MNIST, held in
    memory, takes ``hflip`` only (0 or 0.5). The same transform feeds the teacher's training, the search's KD
    steps and the fine-tune; evaluation never augments.
    """

    scale: Optional[list] = None  # [min, max] area of the random-resized crop; null: [0.08, 1] >= 160 px,
    # [0.25, 1] from 96 px, [0.6, 1] below; [1, 1] with ratio [1, 1]: no crop
    ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])  # aspect range of the crop
    hflip: float = 0.5  # horizontal flip probability
    vflip: float = 0.0  # vertical flip probability
    color_jitter: Optional[float] = None  # brightness/contrast/saturation strength; null: 0.4 >= 160 px, else 0
    auto_augment: Optional[str] = None  # timm policy string, e.g. rand-m9-mstd0.5 (RandAugment), or null: off
    re_prob: float = 0.0  # random erasing probability (0: off)
    re_mode: str = "const"  # const | rand | pixel
    re_count: int = 1


@dataclass
class DataConfig:
    """Where the images come from and how they are split.

    Two splits judge a model: the *holdout* split, ``val_size`` images held out of the training images (never
    trained on) for the search's and fine-tune's decisions, and the *test* split (Fashion-MNIST's test set, an
    image folder's ``val/``), which every report, gate and verdict uses.
    """

    name: str = "fmnist"  # fmnist | imagefolder
    root: Optional[str] = None  # fmnist: $VITRIM_FMNIST_DIR or the Debian package dir
    # the holdout split: a count (>= 1) or a fraction (< 1) of the training images; null: 5000 for Fashion-MNIST
    # (of 60000), 0.1 for an image folder. The resolved count is printed.
    val_size: Optional[float] = None
    split_seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 512
    workers: int = 0  # DataLoader worker processes for image folders (every loader honours it)
    # ImageFolder preprocessing (pipeline/core/preprocessing.py): the input size and channels are the
    # teacher's; these keys win over a config.json beside model.checkpoint, which wins over timm's
    # defaults for the architecture. Fashion-MNIST's is fixed.
    mean: Optional[list] = None
    std: Optional[list] = None
    interpolation: Optional[str] = None  # bilinear | bicubic | nearest (| box | hamming | lanczos)
    crop_pct: Optional[float] = None  # 1.0: no crop (resize to the input size)
    crop_mode: Optional[str] = None  # center | squash | border (timm)
    train_limit: Optional[int] = None  # tiny slices for tests and smoke runs
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """The teacher: any timm ViT by name, with constructor overrides; or a Hugging Face ViT/DeiT folder."""

    # left out (null, or the default): read from a Hugging Face checkpoint folder, else vit_tiny_patch16_224
    arch: Optional[str] = None
    kwargs: dict = field(default_factory=dict)  # e.g. img_size, patch_size, embed_dim, depth
    # .safetensors or .pth (weights_only); a config.json beside it sets preprocessing. Or a folder written by
    # transformers' save_pretrained (ViT/DeiT image classifier; its preprocessor_config.json sets preprocessing)
    checkpoint: Optional[str] = None
    pretrained: bool = False  # timm hub download; needs network
    # the teacher's top-1 (%) in the user's own loop: a teacher that evaluates more than the tolerance below it
    # on the test split stops the command (exit 2) before any search or training; the usual cause is preprocessing
    expected_top1: Optional[float] = None
    expected_top1_tolerance: float = 1.0  # points
    # a teacher whose test top-1 is near chance (100/classes %) stops the command (exit 2) before any search: under
    # (1 + chance_margin) x chance, or not above chance by a one-sided binomial test at p < 0.01. false: only warn
    chance_check: bool = True
    chance_margin: float = 0.5

    def __post_init__(self) -> None:
        from vitrim.pipeline.core import hf

        if not hf.is_hf_folder(self.checkpoint):
            self.arch = self.arch or DEFAULT_ARCH
            return
        arch, kw = hf.timm_arch_and_kwargs(hf.read_config(self.checkpoint))
        # the default arch counts as left out: config sections are built on top of a default ModelConfig
        if self.arch not in (None, DEFAULT_ARCH, arch):
            raise UserError("config", f"model.arch is '{self.arch}', but model.checkpoint '{self.checkpoint}' is a "
                            f"Hugging Face folder that converts to '{arch}'",
                            "leave model.arch out: it is read from the folder's config.json")
        self.arch, self.kwargs = arch, {**kw, **self.kwargs}


DEFAULT_ARCH = "vit_tiny_patch16_224"


@dataclass
class TeacherConfig:
    """Training of the embedded default's teacher (``vitrim train-teacher``)."""

    epochs: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    seed: int = 0
    cache: Optional[str] = None  # checkpoint path; reused when present


@dataclass
class QuantConfig:
    """How an int8 (or fp8) engine is quantized; part of the target, so the LUT measures it."""

    mode: str = "static"  # static: calibrated on training images | dynamic: ORT-CPU weight-only scales
    calib_images: int = 256  # real training images for the calibration
    method: str = "minmax"  # minmax | entropy | percentile (ORT); minmax (= ModelOpt 'max') | entropy (TensorRT);
    # minmax (OpenVINO: NNCF's own statistics)
    # Defaults measured on the tiny test student (ORT 1.31, 384 test images, agreement with fp32):
    # MatMul per-tensor 99.5%, MatMul per-channel 98.4%, MatMul+Gemm per-tensor 96.6%, +Gemm per-channel 89%.
    per_channel: bool = False  # per-output-channel weight scales
    op_types: list = field(default_factory=lambda: ["MatMul"])  # ops to quantize (ORT names: Gemm = the head, Conv)
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI
    quantize_attention: bool = False  # also quantize attention's activation x activation matmuls (QK^T, AV)


@dataclass
class TargetConfig:
    """The engine the model is made fast for."""

    # a name registered in vitrim.export.backends (`vitrim targets` lists them); the export layer checks the name,
    # the backend its precisions and quantization settings (Target.check_available), before any training or measuring
    backend: str = "ort-cpu"
    # fp32 | fp16 (tensorrt, torch) | bf16 (openvino, where the CPU has bf16 units) | int8 (ort-cpu, openvino,
    # tensorrt) | fp8 (tensorrt): `vitrim targets` lists what this machine runs
    precision: str = "fp32"
    batch: int = 64
    threads: int = 2  # CPU backends' intra-op / inference threads
    opt_level: str = "all"  # ort graph optimization: basic | extended | all
    max_batch: Optional[int] = None  # TensorRT profile max (default: 2x batch)
    quant: QuantConfig = field(default_factory=QuantConfig)  # used when precision is int8/fp8


@dataclass
class ProfileConfig:
    """Latency LUT build and validation."""

    lut: Optional[str] = None  # path; default <cache>/lut-<signature>.json, reused when it matches
    embed_points: int = 3  # grid points over the embedding dim (full dim included)
    head_points: int = 0  # 0: every head count 1..H
    qk_points: int = 3
    v_points: int = 3
    mlp_points: int = 5
    warmup: int = 10
    repeats: int = 60  # timed runs per entry, spread over the rounds
    rounds: int = 12  # round-robin visits over all entries (drift on a shared machine hits all alike)
    checks: int = 4  # whole-block measurements that check the separable model
    validate_plans: int = 20
    seed: int = 0
    # issue 14: whole plans (teacher included) measured with the micro-models to fit the composition
    calibration_plans: int = 8
    # issue 15: token-count points of the LUT when the search merges tokens (search.prune_tokens)
    token_points: int = 3
    # issue 23: every visit of a micro-model lasts at least this long (short ones get more runs per visit)
    min_visit_ms: float = 50.0
    # issue 23: an entry whose per-visit ratios to the sentinel spread (MAD) more than this % is measured again; 0: never
    remeasure_spread_pct: float = 3.0


def pct(fraction: float) -> str:
    """A fraction (a budget, a tolerance) as a percentage with the digits it has: 0.45 -> '45%', 0.095 -> '9.5%',
    0.025 -> '2.5%' (``:.0%`` printed those two as 10% and 2%)."""
    return f"{100 * fraction:.4g}%"


STRATEGIES = ("knapsack", "nvit", "slim", "uvc", "uniform", "magnitude", "compound")
STEPWISE = ("knapsack", "nvit", "magnitude")  # the strategies that prune in steps (search.step_epochs)
START_WEIGHTS = ("search", "student")  # search.start_weights: what a search started from an earlier run continues
MERGING = ("knapsack", "nvit")  # the strategies that search token merges (search.prune_tokens, search.merges)


@dataclass
class SearchConfig:
    """Latency-aware structural search (NViT)."""

    strategy: str = "knapsack"  # knapsack | nvit | slim | uvc | uniform | magnitude | compound (STRATEGIES)
    # Exactly one budget. None of them set: budget_fraction = DEFAULT_BUDGET_FRACTION.
    budget_ms: Optional[float] = None
    budget_fraction: Optional[float] = None  # of the teacher's predicted latency
    flops_fraction: Optional[float] = None
    params_fraction: Optional[float] = None
    steps: int = 5
    kd_iters: int = 60  # short KD between pruning steps
    saliency_batches: int = 8
    lr: float = 3e-4
    eta: float = 1.0  # nvit: weight of the latency term (in normalized units)
    align: int = 8
    # issue 23: raise align to the width alignment the LUT measured as fast on the target (LatencyTable.recommended_align)
    align_from_lut: bool = True
    min_heads: int = 1
    min_qk: int = 8
    min_v: int = 8
    min_mlp: int = 16
    prune_embed: bool = True
    prune_blocks: bool = True
    refill: bool = True  # after the last step, put back removed groups that still fit the budget
    min_blocks: int = 1
    seed: int = 0
    # issue 14: closed loop on the engine (latency budgets only)
    measured_tolerance: float = 0.03  # relative miss of the measured ratio that triggers a correction
    measured_rounds: int = 3  # correction rounds at most (0: measure and report only)
    # issue 17: learned-mask strategies (slim: ViT-Slim's l1 masks; uvc: UVC's primal-dual budget, block skipping)
    mask_iters: int = 200  # joint mask + weight KD steps
    mask_lr: float = 0.05  # AdamW rate of the masks (slim) or gate logits (uvc)
    slim_l1: float = 2.0  # slim: weight of the latency-weighted l1 term (in units of the teacher's latency)
    dual_lr: float = 0.5  # uvc: dual ascent rate on the relative budget violation
    gumbel_tau: list = field(default_factory=lambda: [1.0, 0.1])  # uvc: temperature, start and end
    # issue 15: CAIT-style token merges at block boundaries as candidates (knapsack and nvit)
    prune_tokens: bool = False
    max_merges: int = 2  # token merges per plan at most (each halves one or both grid sides)
    # issue 25: how a candidate merge is priced. adapted: the KD-loss change after merge_adapt_iters KD steps of the
    # merged network (against the unmerged one adapted alike), so a bulk change that fine-tuning repairs is not priced
    # as if it stayed; unadapted: the loss change of the merge applied to the weights as they are. unadapted is the
    # default: on the 49-token benchmark adapted was 0.06 pt ahead at 20% and 1.28 and 0.14 pt behind at 10% (two
    # seeds), at 1.2-1.5x the search time (benchmarks/README.md)
    merge_scoring: str = "unadapted"
    merge_adapt_iters: int = 10
    # issue 25: token merges every plan has, searched or not ([{block: i, type: w|h|hw}]): the widths are searched
    # with them in place (the benchmark's forced-merge row); searched merges (prune_tokens) come on top, up to
    # max_merges in all
    merges: Optional[list] = None
    # issue 25, NViT's prune-finetune iterations: KD epochs on the training set after every pruning step but the
    # last (0: search.kd_iters steps only); the last step is followed by the fine-tune (finetune.epochs)
    step_epochs: float = 0.0
    # a progressive curve: the run directory whose searched plan this search starts from instead of the teacher's
    # widths (strategies that prune in steps); start_weights: which weights it continues from there, "search" (the
    # adapted weights that search ended with) or "student" (that run's fine-tuned student on the units it kept)
    start_from: Optional[str] = None
    start_weights: str = "search"


@dataclass
class FinetuneConfig:
    """Knowledge-distillation fine-tune of the sliced student."""

    epochs: int = 3
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    alpha: float = 1.0
    temperature: float = 2.0
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = 1.0
    ema: Optional[float] = None
    amp: str = "auto"  # auto | bf16 | fp16 | off (AMP only on CUDA)
    seed: int = 0
    # issue 25: hidden-state distillation: weight of the MSE between the student's and the teacher's residual
    # stream after every kept block (the student's kept channels, token by token; token means after a merge),
    # in units of the teacher's mean square there (0: logits only)
    hidden_weight: float = 0.0


@dataclass
class ParityTolerance:
    """The parity gate's thresholds for one precision (``export.fp32``, ``export.fp16``, ``export.bf16``,
    ``export.int8``; fp8 uses int8's). Every statistic is per image, so ``target.batch`` cannot change a
    verdict. How each default was calibrated (correct engines' worst values, planted faults' best):
    docs/verification.md."""

    atol: float = 1e-4  # elementwise |e - r| <= atol + rtol*|r| (the reference is the denominator)
    rtol: float = 1e-3
    max_rel_l2: float = 1e-4  # the worst image's ||e - r|| / ||r|| over its logits
    max_mean_rel_l2: float = 1e-5  # the mean over images of the same: a whole-output scale error fails it
    max_prob_js: float = 1e-6  # a high quantile (export.parity_quantile) of the per-image Jensen-Shannon divergence
    max_mean_prob_js: float = 1e-7  # ...and its mean (bits; softmax of engine vs reference)
    max_class_shift: float = 0.002  # no predicted class may gain or lose more than this fraction of the images
    min_top1_agreement: float = 0.99
    max_acc_loss: float = 0.5  # points of top-1 the engine may lose, decided by McNemar's exact test


def _tol(**kw) -> Any:
    return field(default_factory=lambda: ParityTolerance(**kw))


@dataclass
class ExportConfig:
    """ONNX export, engine build and the parity gate."""

    opset: int = 18
    simplify: bool = False
    parity_worst: int = 4  # how many of the worst images (by relative L2 error) parity.json details (>= 1)
    parity_images: Optional[int] = None  # cap on the images the gate sees, both levels (None: the whole test split)
    parity_quantile: float = 0.99  # the per-image quantile the max_prob_js thresholds apply to
    confidence: float = 0.95  # two-sided confidence of every accuracy interval (parity gate, vitrim compare)
    # per precision; defaults calibrated on correct engines with margin (docs/verification.md)
    fp32: ParityTolerance = _tol()
    fp16: ParityTolerance = _tol(atol=2e-2, rtol=2e-2, max_rel_l2=2e-2, max_mean_rel_l2=5e-3, max_prob_js=1e-4,
                                 max_mean_prob_js=1e-5, max_class_shift=0.005, min_top1_agreement=0.99)
    bf16: ParityTolerance = _tol(atol=0.2, rtol=0.1, max_rel_l2=0.1, max_mean_rel_l2=0.03, max_prob_js=2e-3,
                                 max_mean_prob_js=3e-4, max_class_shift=0.01, min_top1_agreement=0.98)
    # int8: logits move by design (loose elementwise), scale, probabilities and decisions may not
    int8: ParityTolerance = _tol(atol=1.0, rtol=1.0, max_rel_l2=0.5, max_mean_rel_l2=0.12, max_prob_js=0.05,
                                 max_mean_prob_js=5e-3, max_class_shift=0.01, min_top1_agreement=0.97)

    def tolerance(self, precision: str) -> ParityTolerance:
        """The thresholds of ``precision`` (fp8 is judged as int8)."""
        return getattr(self, {"fp8": "int8"}.get(precision, precision), self.fp32)

    # issue 24, latency gate (vitrim run): the delivered engine, timed with the teacher in one session, may be at
    # most search.measured_tolerance slower than the requested latency budget, else the run fails with exit 4
    # (off: the miss is only reported). Needs a latency budget (search.budget_ms or budget_fraction).
    require_budget: bool = False
    # quantization-aware recovery (vitrim run): when the student's int8 engine fails the gate, this many KD
    # steps with int8 fake-quant on its Linear layers, then re-quantize and re-gate (0: off)
    int8_recovery_steps: int = 200
    int8_recovery_lr: float = 1e-5
    # issue 24, regression gate (vitrim compare; export.baseline in vitrim run): a release directory to compare
    # the run's release against, re-timed side by side and re-evaluated on the test split on this machine
    baseline: Optional[str] = None
    max_latency_regression: float = 0.03  # candidate / baseline paired latency ratio may exceed 1 by this much
    max_acc_regression: float = 0.3  # points of test top-1 the candidate may lose
    compare_rounds: int = 20  # round-robin rounds of the paired timing (each candidate visit bracketed by baseline)
    compare_repeats: int = 200  # timed runs of the candidate in all, spread over the rounds
    compare_sessions: int = 3  # timing sessions at most: another runs while the ratio is within noise of the gate
    # issue 24, Triton model repository: DIR/<triton_name>/config.pbtxt and DIR/<triton_name>/1/model.{onnx,plan}
    triton: Optional[str] = None
    triton_name: Optional[str] = None  # default: the config's name
    triton_max_batch: Optional[int] = None  # dynamic-batch ONNX: default target.max_batch, else target.batch


@dataclass
class RuntimeConfig:
    """How the host's CPU is used."""

    # torch's intra-op threads for teacher training, the search and the fine-tune (torch.set_num_threads);
    # null: torch's default (all cores). On a shared machine, fewer threads than cores avoid oversubscription.
    # Engines take target.threads.
    threads: Optional[int] = None


@dataclass
class RunConfig:
    """Everything ``vitrim run`` needs."""

    name: str = "run"
    device: str = "auto"  # teacher training, search and fine-tune: auto (CUDA when present) | cpu | cuda
    out_dir: str = "runs/run"
    cache_dir: str = ".cache/vitrim"
    # when cache_dir cannot be written and lacks the teacher or the LUT a command needs: "refuse" (exit 2 before
    # any work) or "temp" (build them in a temporary directory, deleted at exit; what is cached is still read)
    cache_fallback: str = "refuse"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool, dict, list):
        return isinstance(value, tp)
    if origin in (list, dict):
        return isinstance(value, origin)
    return isinstance(value, tp)


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type, data: Any, prefix: str, source: str, default: Any = None) -> Any:
    """``cls`` from a mapping; a nested section starts from its field's default (``export.fp16`` keeps the
    fp16 defaults of the keys it does not set)."""
    if not isinstance(data, dict):
        raise UserError("config", f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}",
                        "check the indentation of that section")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise UserError("config", f"{source}: unknown key '{dotted}'",
                            f"valid keys here: {', '.join(sorted(names))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".", source, _field_default(cls, key))
            continue
        if isinstance(value, str) and _wants_float(tp):
            try:  # PyYAML (YAML 1.1) reads 1e-4 as a string; 1.0e-4 as a float
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise UserError("config", f"{source}: '{dotted}' must be {_tp_name(tp)}, got {value!r}",
                            f"set '{dotted}' to a value of that type")
        kwargs[key] = float(value) if tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp) and isinstance(value, int)) else value
    return dataclasses.replace(default, **kwargs) if isinstance(default, cls) else cls(**kwargs)


def _wants_float(tp: Any) -> bool:
    return tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp)
                           and str not in typing.get_args(tp))


def _tp_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_tp_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise UserError("config", f"override '{item}' is not of the form section.key=value",
                        "use --set search.budget_fraction=0.4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise UserError("config", f"override '{item}': value is not valid YAML ({e})") from None
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError("config", f"override '{item}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError("config", f"config file '{p}' not found", "pass the path of a YAML file, e.g. configs/fmnist_cpu.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError("config", f"{p} is not valid YAML: {e}", "fix the syntax at the line shown") from None
    if isinstance(data, dict) and isinstance(data.get("preprocessing"), dict):
        data.pop("preprocessing")  # the record in a resolved config (save_resolved); data.* carry its values
    file_budgets = _budgets_in(data)
    if len(file_budgets) > 1:
        raise UserError("config", f"{source}: sets {len(file_budgets)} budgets at once "
                        f"({' and '.join('search.' + k for k in file_budgets)})",
                        "keep exactly one of search.budget_ms, budget_fraction, flops_fraction, params_fraction")
    layer: dict = {}
    for item in overrides or []:
        _apply_override(layer, item)
    set_budgets = _budgets_in(layer)
    if len(set_budgets) > 1:
        raise UserError("config", f"the overrides set {len(set_budgets)} budgets at once "
                        f"({' and '.join('search.' + k for k in set_budgets)})",
                        "pass exactly one of --set search.budget_ms / budget_fraction / flops_fraction / params_fraction")
    if set_budgets and isinstance(data.get("search"), dict):
        for k in file_budgets:  # an override's budget replaces the file's (documented above)
            data["search"][k] = None
    for item in overrides or []:
        _apply_override(data, item)
    cfg = _build(RunConfig, data, "", source)
    if not any(getattr(cfg.search, k) is not None for k in BUDGET_KEYS):
        cfg.search.budget_fraction = DEFAULT_BUDGET_FRACTION
    validate_config(cfg, source)
    return cfg


def _budgets_in(data: dict) -> list[str]:
    """The budget keys a raw (YAML / override) mapping sets to a non-null value."""
    search = data.get("search") if isinstance(data, dict) else None
    if not isinstance(search, dict):
        return []
    return [k for k in BUDGET_KEYS if search.get(k) is not None]


def validate_search(cfg: SearchConfig, source: str = "<config>") -> None:
    """Checks on a SearchConfig, also run by the search itself (configs built in code skip load_config)."""
    def bad(key: str, msg: str, fix: str) -> None:
        raise UserError("config", f"{source}: '{key}' {msg}", fix)

    if cfg.strategy not in STRATEGIES:
        bad("search.strategy", f"is '{cfg.strategy}'", f"use one of {', '.join(STRATEGIES)}")
    if cfg.mask_iters < 1:
        bad("search.mask_iters", f"is {cfg.mask_iters}", "use at least 1 (a few hundred is typical)")
    for key in ("mask_lr", "slim_l1", "dual_lr"):
        if not getattr(cfg, key) > 0:
            bad(f"search.{key}", f"is {getattr(cfg, key)}", "use a positive number")
    tau = cfg.gumbel_tau
    if not (isinstance(tau, (list, tuple)) and len(tau) == 2 and all(isinstance(t, (int, float)) and t > 0 for t in tau)):
        bad("search.gumbel_tau", f"is {tau!r}", "use [start, end] temperatures, e.g. [1.0, 0.1]")
    budgets = [k for k in BUDGET_KEYS if getattr(cfg, k) is not None]
    if len(budgets) > 1:
        raise UserError("config", f"{source}: sets {len(budgets)} budgets at once "
                        f"({' and '.join('search.' + k for k in budgets)})",
                        "keep exactly one of search.budget_ms, budget_fraction, flops_fraction, params_fraction")
    for k in ("budget_fraction", "flops_fraction", "params_fraction"):
        v = getattr(cfg, k)
        if v is not None and not 0.0 < v <= 1.0:
            bad(f"search.{k}", f"is {v}", "use a fraction in (0, 1]")
    if cfg.budget_ms is not None and cfg.budget_ms <= 0:
        bad("search.budget_ms", f"is {cfg.budget_ms}", "use a positive latency in ms")
    if cfg.align < 1:
        bad("search.align", f"is {cfg.align}", "use a group size >= 1 (8 keeps widths fit for fast kernels)")
    for k in ("steps", "saliency_batches", "min_heads", "min_blocks", "max_merges"):
        if getattr(cfg, k) < 1:
            bad(f"search.{k}", f"is {getattr(cfg, k)}", "use a value >= 1")
    if cfg.prune_tokens and cfg.strategy not in MERGING:
        bad("search.prune_tokens", f"is true with strategy '{cfg.strategy}'",
            "token merges are searched by the knapsack and nvit strategies: use one of them or set prune_tokens: false")
    if cfg.merge_scoring not in ("adapted", "unadapted"):
        bad("search.merge_scoring", f"is '{cfg.merge_scoring}'", "use adapted or unadapted")
    if cfg.merge_adapt_iters < 1 and cfg.merge_scoring == "adapted" and cfg.prune_tokens:
        bad("search.merge_adapt_iters", f"is {cfg.merge_adapt_iters} with merge_scoring adapted",
            "use at least 1 KD step (10 is the default), or merge_scoring: unadapted")
    if not cfg.step_epochs >= 0:
        bad("search.step_epochs", f"is {cfg.step_epochs}", "use 0 (short KD only) or a number of epochs")
    if cfg.step_epochs and cfg.strategy not in STEPWISE:
        bad("search.step_epochs", f"is {cfg.step_epochs} with strategy '{cfg.strategy}', which does not prune in steps",
            f"use it with {', '.join(STEPWISE)}, or set step_epochs: 0")
    if cfg.start_weights not in START_WEIGHTS:
        bad("search.start_weights", f"is '{cfg.start_weights}'", f"use one of {', '.join(START_WEIGHTS)}")
    if cfg.merges is not None:
        from vitrim.pipeline.core.plan import MERGE_TYPES

        fix = "use a list like [{block: 4, type: hw}] (type w, h or hw), or null"
        if not isinstance(cfg.merges, list):
            bad("search.merges", f"is {cfg.merges!r}", fix)
        for k, m in enumerate(cfg.merges):
            if not (isinstance(m, dict) and set(m) == {"block", "type"} and isinstance(m["block"], int)
                    and not isinstance(m["block"], bool) and isinstance(m["type"], str) and m["type"] in MERGE_TYPES):
                bad(f"search.merges[{k}]", f"is {m!r}", fix)
        blocks = [m["block"] for m in cfg.merges]
        if len(set(blocks)) < len(blocks):
            bad("search.merges", f"has two token merges before one block ({blocks})",
                "merge at most once per block boundary (type hw merges both sides)")
        if cfg.strategy not in MERGING:
            bad("search.merges", f"is set with strategy '{cfg.strategy}'",
                "token merges go with the knapsack and nvit strategies: use one of them or remove search.merges")


def validate_augment(data: DataConfig, source: str = "<config>") -> None:
    """Checks on ``data.augment`` (timm's create_transform would fail late, or silently ignore a bad value)."""
    def bad(key: str, msg: str, fix: str) -> None:
        raise UserError("config", f"{source}: 'data.augment.{key}' {msg}", fix)

    a = data.augment
    for key in ("scale", "ratio"):
        r = getattr(a, key)
        if r is None:
            continue
        ok = (isinstance(r, list) and len(r) == 2 and all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                         for t in r) and 0 < r[0] <= r[1])
        if not ok or (key == "scale" and r[1] > 1):
            bad(key, f"is {r!r}", "use [min, max] with 0 < min <= max" + (" <= 1 (areas)" if key == "scale" else ""))
    for key in ("hflip", "vflip", "re_prob"):
        if not 0 <= getattr(a, key) <= 1:
            bad(key, f"is {getattr(a, key)}", "use a probability in [0, 1]")
    if a.color_jitter is not None and not a.color_jitter >= 0:
        bad("color_jitter", f"is {a.color_jitter}", "use a strength >= 0 (0: off, 0.4 is timm's)")
    if a.re_mode not in ("const", "rand", "pixel"):
        bad("re_mode", f"is '{a.re_mode}'", "use const, rand or pixel")
    if a.re_count < 1:
        bad("re_count", f"is {a.re_count}", "use at least 1")
    if a.auto_augment is not None:
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        make = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(
            a.auto_augment.split("-")[0], auto_augment_transform)
        try:
            make(a.auto_augment, {})
        except Exception as e:  # timm raises AssertionError / KeyError / ValueError on a bad policy string
            bad("auto_augment", f"is '{a.auto_augment}', which timm cannot parse ({type(e).__name__}: {e})",
                "use a timm policy such as rand-m9-mstd0.5, augmix-m5-w4-d2, original or v0, or null")
    if data.name == "fmnist":
        default = AugmentConfig()
        changed = [f.name for f in dataclasses.fields(a) if f.name != "hflip" and getattr(a, f.name) != getattr(default, f.name)]
        if changed:
            bad(changed[0], "is set, but Fashion-MNIST is held in memory as tensors and takes data.augment.hflip only",
                f"remove data.augment.{changed[0]}, or use data.name=imagefolder")
        if a.hflip not in (0, 0.5):
            bad("hflip", f"is {a.hflip}; Fashion-MNIST flips half the images or none", "use 0.5 or 0")


def validate_config(cfg: RunConfig, source: str = "<config>") -> None:
    """Value checks that types alone cannot express."""
    def bad(key: str, msg: str, fix: str) -> None:
        raise UserError("config", f"{source}: '{key}' {msg}", fix)

    if cfg.data.name not in ("fmnist", "imagefolder"):
        bad("data.name", f"is '{cfg.data.name}'", "use fmnist or imagefolder")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        bad("device", f"is '{cfg.device}'", "use auto, cpu or cuda")
    if cfg.cache_fallback not in ("refuse", "temp"):
        bad("cache_fallback", f"is '{cfg.cache_fallback}'", "use refuse or temp")
    if cfg.data.workers < 0:
        bad("data.workers", f"is {cfg.data.workers}", "use 0 (load in the main process) or more workers")
    v = cfg.data.val_size
    if v is not None and not (0 < v < 1 or (v >= 1 and float(v).is_integer())):
        bad("data.val_size", f"is {v}", "use a fraction of the training images in (0, 1), e.g. 0.1, or a count >= 1")
    validate_augment(cfg.data, source)
    if not cfg.model.chance_margin >= 0:
        bad("model.chance_margin", f"is {cfg.model.chance_margin}", "use a fraction of chance >= 0, e.g. 0.5")
    if cfg.runtime.threads is not None and cfg.runtime.threads < 1:
        bad("runtime.threads", f"is {cfg.runtime.threads}", "use a thread count >= 1, or null for torch's default")
    if cfg.data.interpolation not in (None, "bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"):
        bad("data.interpolation", f"is '{cfg.data.interpolation}'", "use bilinear, bicubic or nearest (or box, "
            "hamming, lanczos)")
    if cfg.data.crop_pct is not None and not 0 < cfg.data.crop_pct <= 1:
        bad("data.crop_pct", f"is {cfg.data.crop_pct}", "use a fraction in (0, 1]")
    if cfg.data.crop_mode not in (None, "center", "squash", "border"):
        bad("data.crop_mode", f"is '{cfg.data.crop_mode}'", "use center, squash or border")
    if cfg.data.name == "fmnist":
        for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
            if getattr(cfg.data, key) is not None:
                bad(f"data.{key}", "is set, but data.name=fmnist has a fixed preprocessing (28x28 L, mean 0.2860, "
                    "std 0.3530, no resize or crop)", f"remove data.{key}, or use data.name=imagefolder")
    e = cfg.model.expected_top1
    if e is not None and not 0 < e <= 100:
        bad("model.expected_top1", f"is {e}", "give the teacher's top-1 in percent, e.g. 96.7")
    if not cfg.model.expected_top1_tolerance >= 0:
        bad("model.expected_top1_tolerance", f"is {cfg.model.expected_top1_tolerance}", "use points >= 0, e.g. 1.0")
    if not isinstance(cfg.target.backend, str) or not cfg.target.backend:
        bad("target.backend", f"is {cfg.target.backend!r}", "name an engine; `vitrim targets` lists them")
    q = cfg.target.quant
    if q.mode not in ("static", "dynamic"):
        bad("target.quant.mode", f"is '{q.mode}'", "use static or dynamic")
    if q.method not in ("minmax", "entropy", "percentile"):
        bad("target.quant.method", f"is '{q.method}'", "use minmax, entropy or percentile")
    if q.calib_images < 1:
        bad("target.quant.calib_images", f"is {q.calib_images}", "use at least 1 image (a few hundred is typical)")
    if not q.op_types or not all(isinstance(o, str) for o in q.op_types):
        bad("target.quant.op_types", f"is {q.op_types!r}", "list ONNX op types, e.g. [MatMul, Gemm]")
    if cfg.target.batch < 1:
        bad("target.batch", "must be >= 1", "use a positive batch size")
    validate_search(cfg.search, source)
    if not 0.0 < cfg.search.measured_tolerance < 1.0:  # issue 14
        bad("search.measured_tolerance", f"is {cfg.search.measured_tolerance}", "use a fraction such as 0.03")
    if cfg.search.measured_rounds < 0:
        bad("search.measured_rounds", f"is {cfg.search.measured_rounds}", "use 0 or more rounds")
    if cfg.profile.calibration_plans < 1:
        bad("profile.calibration_plans", f"is {cfg.profile.calibration_plans}", "use at least 1 (the teacher)")
    for k in ("repeats", "rounds"):
        if getattr(cfg.profile, k) < 1:
            bad(f"profile.{k}", f"is {getattr(cfg.profile, k)}", "use a value >= 1")
    for k in ("min_visit_ms", "remeasure_spread_pct"):
        if getattr(cfg.profile, k) < 0:
            bad(f"profile.{k}", f"is {getattr(cfg.profile, k)}", "use a value >= 0 (0 turns it off)")
    if (cfg.search.prune_tokens or cfg.search.merges) and cfg.profile.token_points < 2:
        bad("profile.token_points", f"is {cfg.profile.token_points} with token merges (search.prune_tokens / merges)",
            "use at least 2 (the input token count and the fewest the merges reach), 3 is the default")
    if cfg.export.int8_recovery_steps < 0:
        bad("export.int8_recovery_steps", f"is {cfg.export.int8_recovery_steps}", "use 0 (off) or a number of KD steps")
    if not cfg.export.int8_recovery_lr > 0:
        bad("export.int8_recovery_lr", f"is {cfg.export.int8_recovery_lr}", "use a small positive rate such as 1e-5")
    if cfg.export.parity_worst < 1:
        bad("export.parity_worst", f"is {cfg.export.parity_worst}", "use at least 1 (the worst images listed)")
    if not 0.5 <= cfg.export.confidence < 1:
        bad("export.confidence", f"is {cfg.export.confidence}", "use a two-sided confidence in [0.5, 1), e.g. 0.95")
    if not 0 < cfg.export.parity_quantile <= 1:
        bad("export.parity_quantile", f"is {cfg.export.parity_quantile}", "use a quantile in (0, 1], e.g. 0.99")
    for p in ("fp32", "fp16", "bf16", "int8"):
        t = getattr(cfg.export, p)
        for k, v in dataclasses.asdict(t).items():
            if not v >= 0 or (k != "min_top1_agreement" and not v < float("inf")):
                bad(f"export.{p}.{k}", f"is {v}", "use a finite threshold >= 0, e.g. the default")
        if not 0 <= t.min_top1_agreement <= 1:
            bad(f"export.{p}.min_top1_agreement", f"is {t.min_top1_agreement}", "use a fraction in [0, 1]")
    if cfg.export.require_budget and (cfg.search.flops_fraction is not None or cfg.search.params_fraction is not None):
        bad("export.require_budget", "needs a latency budget, and the search has a "
            f"{'FLOPs' if cfg.search.flops_fraction is not None else 'params'} budget",
            "set search.budget_fraction or search.budget_ms, or export.require_budget=false")  # issue 24
    if not cfg.export.max_latency_regression >= 0:  # issue 24
        bad("export.max_latency_regression", f"is {cfg.export.max_latency_regression}",
            "use a fraction >= 0, e.g. 0.03 (3% slower at most)")
    if not cfg.export.max_acc_regression >= 0:
        bad("export.max_acc_regression", f"is {cfg.export.max_acc_regression}", "use points >= 0, e.g. 0.3")
    if cfg.export.compare_rounds < 2 or cfg.export.compare_repeats < cfg.export.compare_rounds:
        bad("export.compare_rounds", f"is {cfg.export.compare_rounds} with compare_repeats "
            f"{cfg.export.compare_repeats}", "use at least 2 rounds and at least one timed run per round")
    if cfg.export.compare_sessions < 1:
        bad("export.compare_sessions", f"is {cfg.export.compare_sessions}", "use at least 1 timing session")
    if cfg.export.triton_max_batch is not None and cfg.export.triton_max_batch < 1:
        bad("export.triton_max_batch", f"is {cfg.export.triton_max_batch}", "use a positive batch, or null")
    if cfg.export.parity_images is not None and cfg.export.parity_images < 1:
        bad("export.parity_images", f"is {cfg.export.parity_images}", "use a positive image count, or null for all")
    if cfg.finetune.epochs < 0:
        bad("finetune.epochs", f"is {cfg.finetune.epochs}", "use 0 (no fine-tune) or a number of KD epochs")
    if not cfg.finetune.hidden_weight >= 0:
        bad("finetune.hidden_weight", f"is {cfg.finetune.hidden_weight}", "use 0 (logits only) or a positive weight")
    if cfg.finetune.amp not in ("auto", "bf16", "fp16", "off"):
        bad("finetune.amp", f"is '{cfg.finetune.amp}'", "use auto, bf16, fp16 or off")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(obj: Any) -> str:
    """A stable hash of a config (or a section of one), for stage caching."""
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


RESOLVED_HEADER = ("# Written by vitrim. 'preprocessing' records what was resolved and where each field came from;\n"
                   "# the data.* keys carry the same values, so this file alone reproduces the evaluation.\n")


def save_resolved(cfg: RunConfig, out_dir: str | os.PathLike, preprocessing: Any = None) -> Path:
    """Write ``resolved_config.yaml`` atomically into ``out_dir``.

    With the run's :class:`~vitrim.pipeline.core.preprocessing.Preprocessing`, an image folder's
    resolved transforms are written into ``data.*`` and the whole object (with its sources) into a
    ``preprocessing`` section, which :func:`load_config` skips as a record.
    """
    from vitrim.pipeline.core.io import atomic_write_text

    d = config_to_dict(cfg)
    text = ""
    if preprocessing is not None:
        if cfg.data.name != "fmnist":  # fmnist's preprocessing is fixed: it has no data.* keys
            p = preprocessing.timm_kwargs()
            d["data"].update({k: (list(p[k]) if isinstance(p[k], tuple) else p[k])
                              for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")})
        d["preprocessing"] = preprocessing.to_dict()
        text = RESOLVED_HEADER
    from vitrim.pipeline.core.rundir import RunDir

    path = RunDir(out_dir).resolved_config
    atomic_write_text(path, text + yaml.safe_dump(d, sort_keys=False))
    return path
