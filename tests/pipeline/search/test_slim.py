"""ViT-Slim's masks (pipeline/search/slim.py): the network handed on is the masked one, folded exactly."""
import random

import pytest
import timm
import torch

from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from vitrim.pipeline.search import EMBED, attach_gates, detach_gates, fold_masks, masks_from_plan, scale_embed
from tests.conftest import TINY_KW, random_init
from tests.pipeline.core.test_slice import random_plan


@pytest.mark.parametrize("kw", [{}, dict(global_pool="avg", fc_norm=True, class_token=False), dict(final_norm=False),
                                dict(pre_norm=True, final_norm=False, global_pool="avg", class_token=False),
                                dict(global_pool="map", class_token=False, reg_tokens=2, final_norm=False),
                                dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)],
                         ids=["final-norm", "fc-norm", "no-norm-head", "pre-norm", "map-pool-no-norm", "glu"])
def test_slim_fold_equals_the_soft_masked_network_embedding_included(kw):
    """slim hands on the network its masks trained: soft (not 0/1) masks on heads, QK, V, MLP and the embedding,
    folded, equal the masked network at the plan; and the sliced student computes the same."""
    t = random_init(timm.create_model("vit_tiny_patch16_224", **{**TINY_KW, **kw}), seed=4, std=0.15)
    plan = random_plan(describe(t), random.Random(4), embed=True, skip=False)
    assert plan.embed_dim < plan.spec["embed_dim"]
    student, _ = full_size_compact(t)
    hard = masks_from_plan(plan)
    gates = attach_gates(student, hard)  # the plan's 0/1 gates (the embedding's: the LayerNorms' statistics)
    g = torch.Generator().manual_seed(0)
    soft = {k: torch.rand(v.shape, generator=g) * 0.8 + 0.1 for k, v in hard.items() if k.dim != "block"}
    for k, v in soft.items():
        if k != EMBED:
            gates[k].mul_(v)  # trained mask values on the kept units, 0 on the pruned ones
    x = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        remove = scale_embed(student, soft[EMBED])
        masked = student(x)
        remove()
        plain = student(x)  # the same masks, the embedding's dropped: what slim used to hand on
        assert (masked - plain).abs().max() > 0.05  # the embedding mask is not trivial here
        fold_masks(student, soft)
        detach_gates(student)
        attach_gates(student, hard)
        folded = student(x)
        detach_gates(student)
        sliced = slice_model(student.state_dict(), plan)(x)
    torch.testing.assert_close(folded, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)
