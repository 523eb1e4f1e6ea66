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
