"""The newer timm ViT variants: register tokens, SigLIP's attention pool ('map'), qk_norm, QuickGELU and
GELU-tanh MLPs, gated (GLU) MLPs, dynamic_img_size, feature extractors (num_classes=0), hybrid ViTs on a CNN
stem (ResNetV2, a ResNet feature extractor, MobileCLIP's conv stem); and clean refusals.

Each supported variant, on its real timm family at tiny width: a keep-everything plan slices to a model
whose logits are bit-identical to timm's; a random plan (embedding pruned too) and a plan with token
merges slice, export to ONNX, and ORT matches torch; the search's gated full-size model computes what the
sliced one does. What vitrim cannot slice is refused with exit 2 and its reason, never an AttributeError.
"""
import random
from functools import partial

import numpy as np
import pytest
import timm
import torch
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models import build_model_with_cfg, register_model
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem

from vitrim.export.onnx import export_onnx
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import BlockPlan, Plan
from vitrim.pipeline.core.slicing import full_size_compact, load_compact, save_compact, slice_model
from vitrim.pipeline.search import attach_gates, detach_gates, masks_from_plan
from tests.conftest import random_init



def _hybrid(variant: str, backbone: torch.nn.Module, embed_args: dict, pretrained: bool = False, **kwargs):
    """A ViT on a CNN stem, built as timm's vision_transformer_hybrid.py builds its hybrids."""
    kwargs.setdefault("patch_size", 1)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"architecture": variant}  # no weights to name
    return build_model_with_cfg(VisionTransformer, variant, pretrained,
                                embed_layer=partial(HybridEmbed, backbone=backbone, **embed_args), **kwargs)


# timm's hybrid families at test width, registered under names of their own (not vit_*: the coverage table
# counts timm's names), so that vitrim can rebuild their stems by name as it does timm's
@register_model
def vitrim_test_r26_tiny(pretrained=False, **kwargs):
    """vit_small_r26_s32_224's ResNetV2 backbone (StdConv2dSame, GroupNorm, bottlenecks), two narrow stages."""
    backbone = ResNetV2(layers=(1, 1), channels=(32, 64), stem_chs=16, num_classes=0, global_pool="",
                        in_chans=kwargs.get("in_chans", 3), preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=8))
    return _hybrid("vitrim_test_r26_tiny", backbone, {}, pretrained, **kwargs)


@register_model
def vitrim_test_resnet_tiny(pretrained=False, **kwargs):
    """vit_small_resnet26d_224's backbone: a timm ResNet-D feature extractor (BatchNorm, a list of maps), narrow."""
    backbone = timm.create_model("resnet10t", channels=(8, 16, 32, 64), stem_width=8, features_only=True,
                                 out_indices=[2], in_chans=kwargs.get("in_chans", 3))
    return _hybrid("vitrim_test_resnet_tiny", backbone, {}, pretrained, **kwargs)


@register_model
def vitrim_test_mci_tiny(pretrained=False, **kwargs):
    """vit_base_mci_224's MobileCLIP ConvStem (its last conv is the projection: proj=False), narrow."""
    backbone = ConvStem(channels=(8, 8, 48), stride=(2, 2, 2), kernel_size=(2, 2, 2), padding=0,
                        in_chans=kwargs.get("in_chans", 3), act_layer=torch.nn.GELU)
    kwargs = {"embed_dim": 48, "no_embed_class": True, **kwargs}
    return _hybrid("vitrim_test_mci_tiny", backbone, {"proj": False}, pretrained, **kwargs)


SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
VARIANTS = {  # the timm family each one comes from, shrunk to test size
    "reg4-dinov2": ("vit_small_patch14_reg4_dinov2", {}),
    "reg1-gap": ("vit_medium_patch16_reg1_gap_256", {}),
    "siglip-map": ("vit_base_patch16_siglip_224", {}),
    "reg4-map": ("vit_so150m_patch16_reg4_map_256", {}),
    "map-with-prefix": ("vit_tiny_patch16_224", {"class_token": False, "reg_tokens": 2, "global_pool": "map",
                                                 "pool_include_prefix": True}),
    "qk-norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "clip-quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}),
    "siglip-gap-gelu-tanh": ("vit_base_patch32_siglip_gap_256", {}),
    "dinov2-swiglu": ("vit_giant_patch14_dinov2", {}),
    "glu-sigmoid": ("vit_tiny_patch16_224", {"mlp_layer": timm.layers.GluMlp, "mlp_ratio": 2.0}),
    "dynamic-img-size": ("vit_intern300m_patch14_448", {}),
    "hybrid-r-stem": ("vit_tiny_r_s16_p8_224", {"patch_size": 2}),  # timm's own: ResNetV2's stem alone, /4
    "hybrid-resnetv2": ("vitrim_test_r26_tiny", {"patch_size": 1}),
    "hybrid-resnet-features": ("vitrim_test_resnet_tiny", {"patch_size": 1}),
    "hybrid-mci": ("vitrim_test_mci_tiny", {"patch_size": 1}),
}
SPEC_KEY = {"reg4-dinov2": ("reg_tokens", 4), "reg1-gap": ("reg_tokens", 1), "siglip-map": ("global_pool", "map"),
            "reg4-map": ("reg_tokens", 4), "map-with-prefix": ("pool_include_prefix", True),
            "qk-norm": ("qk_norm", True), "clip-quickgelu": ("mlp_act", "quick_gelu"),
            "siglip-gap-gelu-tanh": ("mlp_act", "gelu_tanh"), "dinov2-swiglu": ("mlp_glu", "first"),
            "glu-sigmoid": ("mlp_glu", "last"), "dynamic-img-size": ("dynamic_img_size", True),
            "hybrid-r-stem": ("stem.arch", "vit_tiny_r_s16_p8_224"), "hybrid-resnetv2": ("stem.out_chans", 64),
            "hybrid-resnet-features": ("stem.arch", "vitrim_test_resnet_tiny"),
            "hybrid-mci": ("stem.proj_in_backbone", True)}
HYBRIDS = [v for v in VARIANTS if v.startswith("hybrid-")]


def spec_value(spec: dict, key: str):
    for k in key.split("."):
        spec = spec[k]
    return spec


def make(variant: str, seed: int = 0):
    arch, kw = VARIANTS[variant]
    return random_init(timm.create_model(arch, **{**SMALL, **kw}), seed=seed, std=0.2), arch


def random_plan(spec: dict, rng: random.Random) -> Plan:
    """Every group kind pruned at random (heads, QK, V, MLP units, embedding channels, one block skipped)."""
    sub = lambda n: sorted(rng.sample(range(n), rng.randint(1, n - 1)))  # noqa: E731
    H, hd, M, E = spec["num_heads"], spec["head_dim"], spec["mlp_hidden"], spec["embed_dim"]
    blocks = [BlockPlan(False) if i == 1 else BlockPlan(True, sub(H), sub(hd), sub(hd), sub(M))
              for i in range(spec["depth"])]
    return Plan(spec=spec, embed_keep=sub(E), blocks=blocks).validate()


def ort_matches(model, tmp_path, spec) -> float:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = export_onnx(model, tmp_path / "m.onnx", (spec["in_chans"], *spec["img_size"]))
    x = np.random.default_rng(0).standard_normal((3, spec["in_chans"], *spec["img_size"])).astype(np.float32)
    with OrtCpuRunner(path, threads=1) as r:
        got = r.infer(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_keep_all_is_bit_identical_and_random_plans_slice(variant, tmp_path):
    teacher, arch = make(variant)
    spec = describe(teacher, arch)
    key, value = SPEC_KEY[variant]
    assert spec_value(spec, key) == value  # the variant is really the one under test
    x = torch.randn(2, 3, 32, 32)
    student, full = full_size_compact(teacher)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))
    assert sum(p.numel() for p in student.parameters()) == full.num_params()
    rng = random.Random(variant)
    for merges in ({}, {0: "hw", 2: "w"}):
        plan = random_plan(spec, rng).set_merges(merges).validate()
        sliced = slice_model(teacher, plan)
        assert sum(p.numel() for p in sliced.parameters()) == plan.num_params()
        with torch.no_grad():
            assert torch.isfinite(sliced(x)).all()
    save_compact(sliced, plan, tmp_path / "s")  # the plan alone rebuilds it, no teacher
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "s")(x), sliced(x))


# one export per feature (an export takes seconds): the random plan prunes every group kind and merges tokens
@pytest.mark.parametrize("variant", ["reg1-gap", "reg4-map", "qk-norm", "clip-quickgelu", "siglip-gap-gelu-tanh",
                                     "dinov2-swiglu", "dynamic-img-size", *HYBRIDS])
def test_variant_random_and_merged_plan_exports_and_ort_matches(variant, tmp_path):
    teacher, arch = make(variant, seed=1)
    spec = describe(teacher, arch)
    rng = random.Random(variant)
    plan = random_plan(spec, rng).set_merges({0: "hw", 2: "w"}).validate()
    assert plan.block_tokens()[-1] < Plan.full(spec).block_tokens()[-1]
    assert ort_matches(slice_model(teacher, plan), tmp_path, spec) <= 1e-4


@pytest.mark.parametrize("variant", ["reg4-map", "qk-norm", "dinov2-swiglu", "clip-quickgelu", "map-with-prefix",
                                     "hybrid-resnet-features", "hybrid-mci"])
def test_variant_gated_search_network_equals_the_sliced_network(variant):
    """What the search scores (gates on a full-size model, trial merges) is what it ships."""
    teacher, arch = make(variant, seed=3)
    spec = describe(teacher, arch)
    gated, _ = full_size_compact(teacher)
    x = torch.randn(4, 3, 32, 32)
    rng = random.Random(variant)
    for merges in ({}, {1: "hw"}):
        plan = random_plan(spec, rng).set_merges(merges).validate()
        attach_gates(gated, masks_from_plan(plan))
        gated.set_token_merges(plan.merges)
        with torch.no_grad():
            diff = (gated(x) - slice_model(teacher, plan)(x)).abs().max().item()
        assert diff <= 1e-5, f"{variant} merges={merges}: gated vs sliced {diff:.2e}"
    detach_gates(gated)
    gated.set_token_merges({})
    with torch.no_grad():
        assert torch.equal(gated(x), teacher(x))


@pytest.mark.parametrize("variant", HYBRIDS)
def test_hybrid_stem_is_kept_whole_and_the_student_round_trips(variant, tmp_path):
    """The CNN stem is timm's own module, unpruned; the projection after it loses the pruned embedding channels.
    The plan alone rebuilds the stem (by timm name), and the torch.export program (model.pt2) runs the student."""
    from vitrim.export.release import save_torch_program

    teacher, arch = make(variant, seed=2)
    spec = describe(teacher, arch, VARIANTS[variant][1])
    plan = random_plan(spec, random.Random(variant))
    student = slice_model(teacher, plan)
    stem = teacher.patch_embed.backbone
    want = {k: v for k, v in stem.state_dict().items() if not (spec["stem"]["proj_in_backbone"] and k.startswith(
        f"{len(stem) - 1}."))}
    got = student.stem.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert type(student.stem) is type(stem) or spec["stem"]["proj_in_backbone"]
    assert student.patch_embed.out_channels == len(plan.embed_keep) < spec["embed_dim"]
    assert spec["stem"]["params"] == sum(p.numel() for p in student.stem.parameters()) and spec["stem"]["macs"] > 0
    save_compact(student, plan, tmp_path / "s")
    loaded = load_compact(tmp_path / "s")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = student(x)
        assert torch.equal(loaded(x), y)
        program = torch.export.load(save_torch_program(student, tmp_path / "model.pt2", (3, 32, 32))).module()
        assert (program(x) - y).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch,kw", [("vit_base_mci_224", {"depth": 1, "mlp_ratio": 0.25}),
                                     ("vit_tiny_r_s16_p8_384", {"depth": 1})])
def test_timm_hybrid_names_at_their_own_width_keep_all_is_bit_identical(arch, kw):
    """timm's own hybrid names (their stems at full width; one small block): keep-everything is timm's model."""
    teacher = random_init(timm.create_model(arch, img_size=64, num_classes=5, **kw), seed=4, std=0.2)
    student, plan = full_size_compact(teacher)
    assert plan.spec["stem"]["arch"] == arch
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def test_hybrid_stems_vitrim_cannot_rebuild_are_refused():
    """vitrim rebuilds a stem from the teacher's timm name: a stem that name does not build, or a teacher built
    without a name, is refused with its reason rather than sliced into a student that cannot be loaded."""
    other = ResNetV2(layers=(1,), channels=(32,), stem_chs=16, num_classes=0, global_pool="", preact=False,
                     stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
                     norm_layer=partial(GroupNormAct, num_groups=8))
    swapped = _hybrid("vitrim_test_r26_tiny", other, {}, **{**SMALL, "patch_size": 1})  # another backbone
    with pytest.raises(UserError, match="does not rebuild") as e:
        describe(swapped)
    assert e.value.stage == "model" and "docs/timm-coverage.md" in e.value.fix
    nameless = VisionTransformer(**{**SMALL, "patch_size": 1}, embed_layer=partial(HybridEmbed, backbone=other))
    with pytest.raises(UserError, match="not built by a timm model name"):
        describe(nameless)


def test_feature_extractor_without_head_slices():
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **{**SMALL, "num_classes": 0}), seed=1)
    student, _ = full_size_compact(teacher)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


@pytest.mark.parametrize("arch,kw,reason", [
    ("vit_base_patch16_xp_224", {}, "ParallelScalingBlock"),
    ("vit_small_patch16_18x2_224", {}, "ParallelThingsBlock"),
    ("vit_base_patch16_rpn_224", {}, "ResPostBlock"),
    ("vit_dwee_patch16_reg1_gap_256", {}, "DiffAttention"),
    ("vit_tiny_patch16_224", {"act_layer": torch.nn.ReLU}, "MLP activation ReLU"),
    ("vit_tiny_patch16_224", {"mlp_layer": timm.layers.SwiGLU}, "SwiGLU"),
    ("vit_tiny_patch16_224", {"dynamic_img_pad": True, "dynamic_img_size": True}, "dynamic_img_pad"),
])
def test_unsupported_variants_are_refused_with_their_reason(arch, kw, reason):
    with torch.device("meta"):
        model = timm.create_model(arch, **kw)  # the names' own sizes: nothing is allocated on the meta device
    with pytest.raises(UserError, match=reason) as e:
        describe(model, arch)
    assert e.value.stage == "model" and "docs/timm-coverage.md" in e.value.fix


def test_slim_refuses_a_qk_norm_teacher():
    """slim folds soft masks into weights; a soft QK mask under qk_norm moves the norms' statistics instead."""
    from types import SimpleNamespace

    from vitrim.pipeline.search.slim import Slim

    with pytest.raises(UserError, match="qk_norm"):
        Slim().init_masks(SimpleNamespace(spec={"qk_norm": True}), {}, [])


@pytest.mark.parametrize("arch", ["vit_small_patch16_18x2_224", "vit_base_patch16_rpn_224"])
def test_cli_refuses_an_unsupported_vit_with_exit_2_before_training(arch, tmp_path, capsys):
    from vitrim.pipeline.cli import main

    code = main(["train-teacher", "--set", f"model.arch={arch}", "--set", "model.kwargs={img_size: 28, patch_size: 7, "
                 "in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}",
                 "--set", f"cache_dir={tmp_path}", "--set", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "is not supported by vitrim's slicer" in err and "Traceback" not in err, err


def test_register_token_config_loads_and_its_teacher_slices():
    """configs/fmnist_reg_cpu.yaml (the register-token run) is valid and its teacher is a register-token ViT."""
    from pathlib import Path

    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.models import meta_model

    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "fmnist_reg_cpu.yaml")
    spec = describe(meta_model(cfg.model), cfg.model.arch, cfg.model.kwargs)
    assert spec["reg_tokens"] == 4 and Plan.full(spec).num_prefix == 4 and Plan.full(spec).num_tokens == 20
