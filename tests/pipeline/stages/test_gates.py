"""The gated search network is the network that ships: gated logits == sliced logits.

The search scores and adapts a gated full-size CompactViT, then slices the
teacher-shaped weights with the plan. For every gate kind (heads, QK, V, MLP,
embedding channels, whole blocks), alone and combined, on three timm variants,
both networks must compute the same function.
"""
import random

import pytest
import timm
import torch

from vitrim.pipeline.core.models import canonical_state, describe
from vitrim.pipeline.core.plan import BlockPlan, Plan
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from vitrim.pipeline.stages.saliency import attach_gates, detach_gates
from vitrim.pipeline.stages.search import masks_from_plan
from tests.conftest import random_init

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
VARIANTS = {  # cls token + token pooling; avg pooling without a cls token; distilled (dist token, 2 heads)
    "cls-token": ("vit_tiny_patch16_224", {}),
    "avg-no-cls": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
}
KINDS = ("heads", "qk", "v", "mlp", "embed", "block")


def random_plan(spec: dict, rng: random.Random, kinds: tuple) -> Plan:
    """A plan that prunes only the given gate kinds, each at random."""
    H, hd, M, E = spec["num_heads"], spec["head_dim"], spec["mlp_hidden"], spec["embed_dim"]

    def sub(n: int, on: bool) -> list[int]:
        return sorted(rng.sample(range(n), rng.randint(1, n - 1))) if on else list(range(n))

    blocks = []
    for i in range(spec["depth"]):
        if "block" in kinds and i == 1:  # always skip one, so the kind is really exercised
            blocks.append(BlockPlan(False))
            continue
        blocks.append(BlockPlan(True, sub(H, "heads" in kinds), sub(hd, "qk" in kinds), sub(hd, "v" in kinds),
                                sub(M, "mlp" in kinds)))
    return Plan(spec=spec, embed_keep=sub(E, "embed" in kinds), blocks=blocks).validate()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gated_equals_sliced_for_every_gate_kind(variant):
    arch, kw = VARIANTS[variant]
    teacher = random_init(timm.create_model(arch, **SMALL, **kw), seed=5, std=0.2)
    spec = describe(teacher, arch)
    gated, _ = full_size_compact(teacher)
    x = torch.randn(6, 3, 32, 32)
    rng = random.Random(variant)
    cases = [(k,) for k in KINDS] + [KINDS] * 3  # each kind alone, then all of them at once
    for kinds in cases:
        plan = random_plan(spec, rng, kinds)
        attach_gates(gated, masks_from_plan(plan))
        with torch.no_grad():
            g, s = gated(x), slice_model(teacher, plan)(x)
        diff = (g - s).abs().max().item()
        assert diff <= 1e-5, f"{variant} {kinds}: gated vs sliced max |diff| {diff:.2e}"
    detach_gates(gated)
    with torch.no_grad():  # gates off again: back to the exact teacher
        assert torch.equal(gated(x), teacher(x))


def test_embed_gate_soft_path_is_differentiable_and_pruned_inputs_are_ignored():
    """At 0/1 gates, whatever sits in a pruned residual channel never reaches the logits."""
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **SMALL), seed=6, std=0.2)
    gated, _ = full_size_compact(teacher)
    rng = random.Random(0)
    plan = random_plan(describe(teacher), rng, ("embed",))
    gates = attach_gates(gated, masks_from_plan(plan))
    pruned = [c for c in range(SMALL["embed_dim"]) if c not in plan.embed_keep]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = gated(x)
        gated.pos_embed[..., pruned] += 100.0  # junk in pruned channels only
        assert (gated(x) - ref).abs().max().item() <= 1e-5
    gates["embed"].requires_grad_(True)
    gated(x).sum().backward()
    assert torch.isfinite(gates["embed"].grad).all() and gates["embed"].grad.abs().sum() > 0
    assert canonical_state(teacher).keys() == gated.state_dict().keys()


def test_embed_saliency_is_on_the_scale_of_the_other_gates(fmnist_dir):
    """Every gate's dL/dg estimates the same thing, the loss change of removing its unit.

    Compare the first-order estimate with the loss change measured by zeroing
    each unit: for embedding channels the ratio must be about 1, as it is for
    MLP neurons (a residual gate compounded per block made it ~3x).
    """
    import copy

    import numpy as np

    from tests.conftest import TINY_KW
    from vitrim.pipeline.core.config import DataConfig
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.stages.distill import make_kd_fn

    x, y = build_splits(DataConfig(root=fmnist_dir, train_limit=128, val_limit=64, test_limit=64)).train[list(range(128))]
    t = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=0, std=0.15)
    s, _ = full_size_compact(t)
    kd = make_kd_fn(copy.deepcopy(t), 1.0, 2.0)
    torch.manual_seed(0)
    with torch.no_grad():  # off the KD optimum, as during the search
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    gates = attach_gates(s)
    for g in gates.values():
        g.requires_grad_(True)
    loss = kd(s, x, y)
    grads = dict(zip(gates, torch.autograd.grad(loss, list(gates.values()))))
    ratio = {}
    with torch.no_grad():
        for name in ("embed", "b0.mlp"):
            g, r = gates[name], []
            for u in range(16):
                g[u] = 0
                actual = (kd(s, x, y) - loss).item()
                g[u] = 1
                r.append(abs(grads[name][u].item()) / max(abs(actual), 1e-9))
            ratio[name.split(".")[-1]] = r
    med = {k: float(np.median(v)) for k, v in ratio.items()}
    assert 0.7 <= med["mlp"] <= 1.4  # the reference: a gate that enters once
    assert 0.5 <= med["embed"] <= 2.0, med
