"""The learned-mask strategies (issue 17): slim (ViT-Slim) and uvc (UVC), on a tiny model and a real ORT LUT."""
import pytest
import torch

from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.slicing import full_size_compact
from vitrim.pipeline.stages.search import run_search
from tests.pipeline.stages.test_search import cfg, kill_head, teacher


@pytest.fixture(scope="module")
def data(fmnist_dir):
    from vitrim.pipeline.core.config import DataConfig
    from vitrim.pipeline.core.data import build_splits

    return build_splits(DataConfig(root=fmnist_dir, train_limit=512, val_limit=128, test_limit=128))


def frac_for(lut, frac, skip_blocks=False):
    """``frac`` raised, where needed, to 40% of the way from the no-skip floor (the tiny LUT's floor is high)."""
    from vitrim.pipeline.core.plan import Floors
    from vitrim.pipeline.stages.search import floor_plan

    blocks = 1 if skip_blocks else lut.spec["depth"]
    lower = lut.predict(floor_plan(lut.spec, Floors(), lut.grid.embed[0], blocks, 8)) / lut.predict(Plan.full(lut.spec))
    return max(frac, round(lower + 0.4 * (1 - lower), 3))


def mcfg(strategy, **kw):
    base = dict(strategy=strategy, mask_iters=30, kd_iters=3, steps=2, budget_fraction=0.6, mask_lr=0.05)
    base.update(kw)
    return cfg(**base)


def search(t, lut, data, c):
    student, _ = full_size_compact(t)
    return run_search(t, student, lut, c, data.train, data.val, batch_size=64, log=lambda m: None)


@pytest.mark.parametrize("strategy", ["slim", "uvc"])
def test_plan_meets_the_budget_and_the_seed_fixes_it(strategy, data, tiny_lut):
    lut, _ = tiny_lut
    f = frac_for(lut, 0.6)
    runs = [search(teacher(seed=3), lut, data, mcfg(strategy, budget_fraction=f, steps=4)) for _ in range(2)]
    for r in runs:
        assert lut.predict(r.plan) <= r.budget + 1e-9
        assert r.budget == pytest.approx(f * lut.predict(Plan.full(lut.spec)))
        assert r.plan.meta["strategy"] == strategy and r.log[-1]["val_top1"] is not None
    assert runs[0].plan.to_dict() == runs[1].plan.to_dict()
    if strategy == "uvc":  # the soft-versus-realised gap is reported
        g = runs[0].plan.meta["uvc"]
        assert g["soft"] > 0 and g["realised"] > 0 and "gap_pct" in g
    else:  # slim's masks stay in [0, 1], moved, and the l1 term falls over training
        recs = [h for h in runs[0].log if "l1" in h]
        assert len(recs) == 4
        assert all(0.0 <= h["mask_min"] <= h["mask_max"] <= 1.0 for h in recs)
        assert recs[-1]["l1"] < recs[0]["l1"] and recs[0]["mask_min"] < 1.0


@pytest.mark.parametrize("strategy", ["slim", "uvc"])
def test_planted_dead_head_is_removed(strategy, data, tiny_lut):
    lut, _ = tiny_lut
    r = search(kill_head(teacher(seed=5)), lut, data, mcfg(strategy, budget_fraction=frac_for(lut, 0.8), prune_blocks=False))
    b0 = r.plan.blocks[0]
    assert b0.keep and 1 not in b0.heads


def test_uvc_skips_a_block_planted_as_identity(data, tiny_lut):
    lut, _ = tiny_lut
    t = teacher(seed=6)
    with torch.no_grad():  # block 1's residual branches add nothing: the block is the identity
        for lin in (t.blocks[1].attn.proj, t.blocks[1].mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    r = search(t, lut, data, mcfg("uvc", budget_fraction=0.7, mask_iters=60, min_blocks=1))
    assert not r.plan.blocks[1].keep and r.plan.blocks[0].keep


@pytest.mark.parametrize("kw", [{}, dict(global_pool="avg", fc_norm=True, class_token=False), dict(final_norm=False),
                                dict(pre_norm=True, final_norm=False, global_pool="avg", class_token=False)],
                         ids=["final-norm", "fc-norm", "no-norm-head", "pre-norm"])
def test_slim_fold_equals_the_soft_masked_network_embedding_included(kw):
    """slim hands on the network its masks trained: soft (not 0/1) masks on heads, QK, V, MLP and the embedding,
    folded, equal the masked network at the plan; and the sliced student computes the same."""
    import random

    import timm

    from tests.conftest import TINY_KW, random_init
    from tests.pipeline.core.test_slice import random_plan
    from vitrim.pipeline.core.models import describe
    from vitrim.pipeline.core.slicing import slice_model
    from vitrim.pipeline.stages.masks import fold_masks, scale_embed
    from vitrim.pipeline.stages.saliency import attach_gates, detach_gates
    from vitrim.pipeline.stages.search import masks_from_plan

    t = random_init(timm.create_model("vit_tiny_patch16_224", **{**TINY_KW, **kw}), seed=4, std=0.15)
    plan = random_plan(describe(t), random.Random(4), embed=True, skip=False)
    assert plan.embed_dim < plan.spec["embed_dim"]
    student, _ = full_size_compact(t)
    hard = masks_from_plan(plan)
    gates = attach_gates(student, hard)  # the plan's 0/1 gates (the embedding's: the LayerNorms' statistics)
    g = torch.Generator().manual_seed(0)
    soft = {k: torch.rand(v.shape, generator=g) * 0.8 + 0.1 for k, v in hard.items() if not k.endswith(".block")}
    for k, v in soft.items():
        if k != "embed":
            gates[k].mul_(v)  # trained mask values on the kept units, 0 on the pruned ones
    x = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        remove = scale_embed(student, soft["embed"])
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
