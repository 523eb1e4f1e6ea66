"""Group keys, candidates and plan surgery (pipeline/search/groups.py)."""
import pytest

from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.search import (EMBED, WIDTH_DIMS, Candidate, GroupKey, apply_addition, apply_removal, candidates,
                                    masks_from_plan)


def test_group_keys_are_typed_values():
    assert GroupKey("mlp", 3) == GroupKey("mlp", 3) and len({GroupKey("mlp", 3), GroupKey("mlp", 3), EMBED}) == 2
    assert str(GroupKey("qk", 2)) == "b2.qk" and str(EMBED) == "embed" and str(GroupKey("merge", 1, "hw")) == "b1.merge:hw"
    for bad in (("mlp",), ("embed", 0), ("merge", 1), ("merge", 1, "diag"), ("qk", 1, "hw"), ("channels", 0)):
        with pytest.raises(ValueError):
            GroupKey(*bad)
    with pytest.raises(AttributeError):  # frozen: a key cannot change under a dict
        GroupKey("v", 0).block = 1


def test_masks_of_a_plan_cover_every_group(tiny_spec):
    full = Plan.full(tiny_spec)
    plan = apply_removal(apply_removal(full, GroupKey("block", 1), 1), GroupKey("v", 0), 8, list(range(8)))
    m = masks_from_plan(plan)
    assert set(m) == {EMBED} | {GroupKey(d, i) for i in range(tiny_spec["depth"]) for d in (*WIDTH_DIMS, "block")}
    assert m[GroupKey("v", 0)][:8].sum() == 0 and m[GroupKey("v", 0)][8:].sum() == tiny_spec["head_dim"] - 8
    assert m[GroupKey("block", 1)].item() == 0 and m[GroupKey("mlp", 1)].sum() == 0
    assert m[EMBED].sum() == tiny_spec["embed_dim"]


def test_removal_and_addition_undo_each_other(tiny_spec):
    full = Plan.full(tiny_spec)
    for key, units in ((GroupKey("mlp", 0), [3, 9]), (GroupKey("heads", 1), [0]), (EMBED, [8, 9, 10])):
        less = apply_removal(full, key, units=units)
        assert less.to_dict() != full.to_dict()
        assert apply_addition(less, Candidate(key, units, 1.0)).to_dict() == full.to_dict()
        assert apply_addition(full, Candidate(key, units, 1.0)) is None  # already there
    b1 = full.blocks[1]
    skipped = apply_removal(full, GroupKey("block", 1))
    assert apply_addition(skipped, Candidate(GroupKey("block", 1), [], 1.0, snapshot=b1)).to_dict() == full.to_dict()


def test_candidates_respect_floors_and_alignment(tiny_spec):
    """One cheapest group per block and width dim, at the alignment, never below a floor; blocks above
    min_blocks; the embedding above its floor."""
    full = Plan.full(tiny_spec)
    scores = {k: v + 1.0 for k, v in masks_from_plan(full).items()}
    cands = candidates(full, scores, Floors(), 8, 1, 8, allow_embed=True, allow_blocks=True)
    keys = [c.key for c in cands]
    assert len(keys) == len(set(keys))
    assert {c.dim for c in cands} == {*WIDTH_DIMS, "block", "embed"}
    for c in cands:
        assert len(c.units) == (0 if c.dim == "block" else 1 if c.dim == "heads" else 8)
    floor = Plan(full.spec, list(range(8)), [type(b)(True, [0], list(range(8)), list(range(8)), list(range(16)))
                                             for b in full.blocks])
    assert candidates(floor, scores, Floors(), 8, 2, 8, True, True) == []  # at every floor, min_blocks = depth
