"""Distillation losses (pipeline/core/distill.py): hidden-state distillation (finetune.hidden_weight)."""
import copy

import pytest
import timm
import torch

from vitrim.pipeline.core.distill import hidden_loss, make_kd_fn
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from tests.conftest import TINY_KW, random_init

KW = dict(TINY_KW, depth=3, class_token=False, global_pool="avg")


def test_hidden_loss_is_relative_and_pools_tokens_after_a_merge():
    t = torch.randn(4, 16, 8)
    keep = [0, 2, 3, 5]
    assert float(hidden_loss([t[..., keep]], [t], keep)) == pytest.approx(0.0, abs=1e-7)
    assert float(hidden_loss([2 * t[..., keep]], [t], keep)) == pytest.approx(1.0, rel=1e-5)
    merged = t[..., keep].mean(1, keepdim=True).expand(4, 4, 4)  # 4 tokens: compared by token means
    assert float(hidden_loss([merged], [t], keep)) == pytest.approx(0.0, abs=1e-7)


def test_hidden_distillation_sees_the_kept_blocks_and_channels_of_a_sliced_student(fmnist_dir):
    """The whole-teacher student's hidden term is 0; a sliced student (a block skipped, 8 channels dropped, a merge)
    gets a positive, finite term whose gradient reaches its weights; hooks do not stay on the teacher."""
    t = random_init(timm.create_model("vit_tiny_patch16_224", **KW), seed=0, std=0.15).eval()
    from vitrim.pipeline.core.config import DataConfig
    from vitrim.pipeline.core.data import build_splits

    x, y = build_splits(DataConfig(root=fmnist_dir, train_limit=16, val_limit=8, test_limit=8)).train[list(range(8))]
    plain, hidden = make_kd_fn(copy.deepcopy(t), 1.0, 2.0), make_kd_fn(t, 1.0, 2.0, hidden_weight=1.0)
    full = slice_model(full_size_compact(t)[0].state_dict(), Plan.full(describe(t)))
    assert float(hidden(full, x, y)) == pytest.approx(float(plain(full, x, y)), abs=1e-5)
    plan = Plan.full(describe(t))
    plan.blocks[1].keep = False
    plan.embed_keep = plan.embed_keep[8:]
    plan.set_merges({2: "hw"})
    student = slice_model(full_size_compact(t)[0].state_dict(), plan.validate()).train()
    extra = float(hidden(student, x, y)) - float(plain(student, x, y))
    assert 0 < extra < 1e3
    hidden(student, x, y).backward()
    assert student.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert not any(b._forward_hooks for b in t.blocks)
