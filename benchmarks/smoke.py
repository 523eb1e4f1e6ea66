"""``--smoke``: a benchmark script's whole code path at tiny sizes, in seconds; its figures mean nothing.

Every script here takes ``--smoke``, and ``tests/test_benchmarks.py`` runs every benchmark command that
benchmarks/README.md and README.md document with it, so a refactor cannot break one unnoticed. A config-driven
script appends :data:`SETS` to its ``--set`` overrides (a 4-block dim-32 ViT on 256 Fashion-MNIST images (4 blocks: a skipped block reaches the budgets the docs use), a
coarse LUT, one search step, one fine-tune epoch); the deit parts build :data:`DEIT_KW`, a 32 px DeiT of the same
family (deit_shapes.py: the first model, one build); timing sessions take :func:`timing`'s counts.
"""
from __future__ import annotations

SETS = ["data.train_limit=256", "data.val_limit=64", "data.test_limit=64", "data.val_size=1000",
        "data.batch_size=64", "data.eval_batch_size=64",
        "model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 4, "
        "num_heads: 2, mlp_ratio: 2.0, global_pool: avg, class_token: false}",
        "model.chance_check=false",  # one teacher epoch on 256 images may stay near chance
        "teacher.epochs=1", "target.batch=8", "target.threads=1", "target.quant.calib_images=16",
        "profile.embed_points=2", "profile.head_points=0", "profile.qk_points=1", "profile.v_points=1",
        "profile.mlp_points=2", "profile.warmup=1", "profile.repeats=4", "profile.rounds=2", "profile.checks=1",
        "profile.min_visit_ms=0", "profile.remeasure_spread_pct=0", "profile.calibration_plans=2",
        "profile.validate_plans=2", "profile.token_points=2",
        "search.steps=1", "search.kd_iters=2", "search.saliency_batches=1", "search.measured_rounds=0",
        "search.mask_iters=4", "search.merge_adapt_iters=1", "search.step_epochs=0",
        "finetune.epochs=1", "export.int8_recovery_steps=0", "export.parity_worst=1",
        "export.compare_rounds=2", "export.compare_repeats=4", "export.compare_sessions=1",
        # 64 test images cannot decide an int8 engine's decisions (one flip is a 1.6% shift): the smoke checks the
        # code path, so the int8 decision checks are left wide (the logit checks stay)
        "export.int8.min_top1_agreement=0.0", "export.int8.max_class_shift=1.0", "export.int8.max_acc_loss=100.0"]

DEIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def timing(smoke: bool, repeats: int, rounds: int, warmup: int) -> dict:
    """``time_interleaved``'s counts: the benchmark's own, or 4 runs over 2 rounds after 1 warm-up."""
    return dict(repeats=4, rounds=2, warmup=1) if smoke else dict(repeats=repeats, rounds=rounds, warmup=warmup)
