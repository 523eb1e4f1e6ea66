"""Gates and saliency (pipeline/search/saliency.py).

The gated search network is the network that ships: the search scores and
adapts a gated full-size CompactViT, then slices the teacher-shaped weights with
the plan. For every gate kind (heads, QK, V, MLP, embedding channels, whole
blocks), alone and combined, on three timm variants, both networks must compute
the same function. Scores find planted dead heads, identity blocks and dead
embedding channels; token merges are priced on the gates' scale.
"""
import copy
import dataclasses
import random

import pytest
import timm
import torch

from vitrim.pipeline.core.models import canonical_state, describe
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from vitrim.pipeline.search import (EMBED, GroupKey, LatencyCost, MacsCost, attach_gates, candidates, detach_gates,
                                    floor_plan, masks_from_plan, mean_loss, merge_options, merge_scores, prune_to)
from tests.conftest import random_init
from tests.pipeline.search.helpers import (DEAD, POOL_KW, cfg, dead_channel_teacher, identity_block, kill_head,
                                           scored, scores_for, teacher)

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
    gates[EMBED].requires_grad_(True)
    gated(x).sum().backward()
    assert torch.isfinite(gates[EMBED].grad).all() and gates[EMBED].grad.abs().sum() > 0
    assert canonical_state(teacher).keys() == gated.state_dict().keys()


def test_embed_saliency_is_on_the_scale_of_the_other_gates(fmnist_dir):
    """Every gate's dL/dg estimates the same thing, the loss change of removing its unit.

    Compare the first-order estimate with the loss change measured by zeroing
    each unit: for embedding channels the ratio must be about 1, as it is for
    MLP neurons (a residual gate compounded per block made it ~3x).
    """
    import numpy as np

    from tests.conftest import TINY_KW
    from vitrim.pipeline.core.config import DataConfig
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.core.distill import make_kd_fn

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
        for key in (EMBED, GroupKey("mlp", 0)):
            g, r = gates[key], []
            for u in range(16):
                g[u] = 0
                actual = (kd(s, x, y) - loss).item()
                g[u] = 1
                r.append(abs(grads[key][u].item()) / max(abs(actual), 1e-9))
            ratio[key.dim] = r
    med = {k: float(np.median(v)) for k, v in ratio.items()}
    assert 0.7 <= med["mlp"] <= 1.4  # the reference: a gate that enters once
    assert 0.5 <= med["embed"] <= 2.0, med


def test_planted_dead_head_goes_first(data, planted_lut):
    lut, _ = planted_lut
    t = kill_head(teacher())
    sc = scores_for(t, data)
    assert sc[GroupKey("heads", 0)][1].item() == 0.0
    assert sc[GroupKey("heads", 0)][0].item() > 0 and (sc[GroupKey("heads", 1)] > 0).all()
    full = Plan.full(lut.spec)
    cost = LatencyCost(lut)
    plan, removed = prune_to(full, sc, cost, cost.predict(full) - 1e-6, cfg(), e_min=8)
    assert (removed[0].block, removed[0].dim, removed[0].units) == (0, "heads", [1])
    assert plan.blocks[0].heads == [0]


def test_planted_identity_block_is_skipped(data, planted_lut):
    lut, _ = planted_lut
    sc = scores_for(identity_block(teacher(seed=1)), data)
    assert sc[GroupKey("block", 1)].item() == 0.0 and sc[GroupKey("block", 0)].item() > 0
    full = Plan.full(lut.spec)
    cost = LatencyCost(lut)
    plan, removed = prune_to(full, sc, cost, cost.predict(full) - 1e-6, cfg(), e_min=8)
    assert removed[0].dim == "block" and removed[0].block == 1
    assert not plan.blocks[1].keep and plan.blocks[0].keep


def test_planted_dead_embed_channels_go_first(data, planted_lut):
    lut, _ = planted_lut
    t = dead_channel_teacher()
    sc = scores_for(t, data)
    live = [c for c in range(32) if c not in DEAD]
    # Removing them still moves the LayerNorm statistics (their zeros count in mean and variance),
    # so their score is small, not zero; it must be below the cheapest group of live channels.
    cheapest_live = sc[EMBED][live].sort().values[:8].sum()
    assert 0 < sc[EMBED][DEAD].sum() < 0.5 * cheapest_live
    full = Plan.full(lut.spec)
    # The MACs budget (search.flops_fraction): on the tiny model a freshly measured LUT's embedding
    # savings are timer noise, which decides whether the embedding shrinks at all, not which channels go.
    cost = MacsCost()
    # prune close to the floor, so the embedding dim must shrink; the dead group must go first
    lower = cost.predict(floor_plan(lut.spec, Floors(), 8, 1, 8))
    plan, removed = prune_to(full, sc, cost, lower + 0.05 * (cost.predict(full) - lower), cfg(), e_min=8)
    embed_steps = [c.units for c in removed if c.dim == "embed"]
    assert embed_steps and embed_steps[0] == DEAD


def merge_setup(data):
    """A tiny ViT with informative tokens, scored: (gated student, gates, KD loss, batches, every merge option of the
    full plan, the width candidates that calibrate the merges' scale)."""
    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=0, std=0.15)
    full = Plan.full(describe(t))
    student, gates, kd, batches, scores = scored(t, data, full)
    return (student, gates, kd, batches, merge_options(full, 2, 1),
            candidates(full, scores, Floors(), 8, 1, 8, True, True))


def test_informative_tokens_make_merges_costly(data):
    """A model with its patch embedding intact: merging changes the output, so the loss rises."""
    student, gates, kd, batches, options, groups = merge_setup(data)
    merges, info = merge_scores(student, gates, kd, batches, {}, options, groups)
    assert all(v > 0 for v in merges.values())
    assert max(info["loss_increase"].values()) > 1e-3


def test_merges_are_priced_like_width_groups_with_the_same_loss_change(data):
    """A gate's saliency is quadratic in the loss change it estimates (NViT's (sum dL/dw * w)^2). With width groups
    planted on that law (saliency = kappa * dL^2, dL measured, spread over > 4x), a merge's score must be what a
    width group with the same loss change scores: kappa * dL_merge^2. So equal loss changes get equal scores, and
    k times the loss change costs k^2 times the score, for merges as for width groups."""
    t = random_init(timm.create_model("vit_tiny_patch16_224", **POOL_KW), seed=0, std=0.15)
    full = Plan.full(describe(t))
    student, gates, kd, batches, scores = scored(t, data, full)
    base = mean_loss(student, kd, batches)

    def group_dl(c):
        g = gates[c.key]
        old = g.clone()
        g[c.units if c.dim != "block" else slice(None)] = 0
        d = mean_loss(student, kd, batches) - base
        g.copy_(old)
        return d

    def merge_dl(key):
        student.set_token_merges({key.block: key.type})
        d = mean_loss(student, kd, batches) - base
        student.set_token_merges({})
        return d

    kappa = 3.0
    groups = [(c, group_dl(c)) for c in candidates(full, scores, Floors(), 8, 1, 8, True, True)]
    planted = [dataclasses.replace(c, saliency=kappa * d * d) for c, d in groups if d > 1e-3]
    dls = [d for _, d in groups if d > 1e-3]
    assert len(planted) >= 4 and max(dls) > 4 * min(dls)  # a spread a linear map cannot follow
    options = merge_options(full, 2, 1)
    merges, info = merge_scores(student, gates, kd, batches, {}, options, planted)
    dl = {o: merge_dl(o) for o in options}
    assert max(dl.values()) > 4 * min(dl.values()) > 0
    for o, d in dl.items():  # the saliency a width group with this loss change has
        assert merges[o] == pytest.approx(kappa * d * d, rel=1e-3)
    lo, hi = min(dl, key=dl.get), max(dl, key=dl.get)
    r = dl[hi] / dl[lo]
    assert merges[hi] / merges[lo] == pytest.approx(r * r, rel=1e-3)  # as for two width groups r times apart


def test_relative_magnitude_puts_every_group_on_one_scale():
    """The magnitude strategy's scores: each group's L1 magnitudes over their mean (a head's weights and an MLP
    neuron's differ in scale by their fan-in), so every group's mean is 1 and its order is the L1 order."""
    from vitrim.pipeline.search import magnitude_scores, relative_magnitude

    student, _ = full_size_compact(teacher(seed=3))
    raw, rel = magnitude_scores(student), relative_magnitude(student)
    assert rel.keys() == raw.keys() and EMBED in rel
    for k, v in rel.items():
        assert v.mean().item() == pytest.approx(1.0, rel=1e-5)
        assert torch.equal(v.argsort(stable=True), raw[k].argsort(stable=True))


def _kd_steps(kd, batches, n, lr):
    """An ``adapt(model)``: ``n`` KD steps on ``batches`` (cycled), AdamW at ``lr``."""
    from vitrim.pipeline.search import kd_adapt

    def adapt(model):
        it = iter(batches * n)
        kd_adapt(model, kd, lambda: next(it), torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), n)

    return adapt


def test_adapted_merge_scoring_with_no_adaptation_is_the_unadapted_scoring(data):
    """The adapted scoring's plumbing: with an adaptation that changes nothing, every merge's loss change and the
    scale are the unadapted scoring's, and so is every score above its noise floor (the standard error of the
    change over the batches); the student scored is left as it was."""
    student, gates, kd, batches, options, groups = merge_setup(data)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plain, info0 = merge_scores(student, gates, kd, batches, {}, options, groups)
    same, info1 = merge_scores(student, gates, kd, batches, {}, options, groups, adapt=lambda m: None)
    assert info1["scoring"] == "adapted" and info0["scoring"] == "unadapted"
    assert info1["adapted_base_loss"] == pytest.approx(info0["base_loss"], rel=1e-6)
    assert info1["scale"] == pytest.approx(info0["scale"], rel=1e-6)
    above = [k for k in options if info0["loss_increase"][f"{k.block}:{k.type}"] > info1["noise_floor"][f"{k.block}:{k.type}"]]
    assert above
    for k in options:
        key = f"{k.block}:{k.type}"
        assert info1["loss_increase"][key] == pytest.approx(info0["loss_increase"][key], rel=1e-4, abs=1e-7)
        if k in above:
            assert same[k] == pytest.approx(plain[k], rel=1e-3)
        else:  # priced at the floor, never below the plain scoring's figure
            assert same[k] >= plain[k] and same[k] > 0
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not student.merges


def test_adaptation_repairs_a_merge_and_lowers_its_price(data):
    """A merge of every 2x2 window before block 0 is a bulk change that KD repairs: after 30 KD steps (on other
    batches than the ones scored) of the merged network, its loss increase over the unmerged one adapted alike is
    well below the unadapted increase, and so is its price (measured: 0.17 unadapted, -0.002 adapted)."""
    student, gates, kd, batches, options, groups = merge_setup(data)
    plain, info0 = merge_scores(student, gates, kd, batches, {}, options, groups)
    other = [data.train[list(range(i * 64, (i + 1) * 64))] for i in range(2, 6)]  # not the batches scored on
    adapted, info1 = merge_scores(student, gates, kd, batches, {}, options, groups,
                                  adapt=_kd_steps(kd, other, 30, 2e-3))
    bulk = GroupKey("merge", 0, "hw")
    d0, d1 = info0["loss_increase"]["0:hw"], info1["loss_increase"]["0:hw"]
    assert d0 > 1e-2 and d1 < 0.6 * d0, (d0, d1)
    assert 0 < adapted[bulk] < 0.5 * plain[bulk]  # repaired, but never free: priced at least at its noise floor
